"""The trained generator as an MLflow pyfunc model, logged as "models from code".

MLflow stores this file's source, not a pickled object, and the weights travel as the
``gan`` artifact (the ``models/gan`` folder: safetensors plus config.json). Loaded with
``mlflow.pyfunc.load_model(uri)`` or served by ``mlflow models serve``, ``predict`` maps rows of
float32 z (B, latent_dim) to images (B, 1, 28, 28) in [-1, 1], from the EMA generator when the
folder has one. A class-conditional generator takes one more column, the digit (0-9) each row
asks for: (B, latent_dim + 1). An ndarray or a DataFrame of those columns will do.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class GeneratorModel(PythonModel):
    """Rows of z (and a digit, when conditional) -> images (B, 1, 28, 28) in [-1, 1]."""

    def load_context(self, context: Any) -> None:
        """Build the generator from the ``gan`` artifact folder."""
        from mnist_gan.models import load_generator

        self.generator, self.cfg = load_generator(context.artifacts["gan"], prefer_ema=True)

    # No type hints here on purpose: MLflow reads predict's hints as an input schema, and the
    # signature logged with the model already describes the input.
    def predict(self, context, model_input, params=None):
        """Generate one image per row of ``model_input`` (an array or a DataFrame)."""
        rows = np.asarray(model_input, dtype=np.float32)  # (B, latent_dim [+ 1])
        latent, conditional = self.cfg.latent_dim, self.cfg.conditional
        width = latent + int(conditional)
        if rows.ndim != 2 or rows.shape[1] != width:
            what = f"{latent} values of z and the digit" if conditional else f"{latent} of z"
            raise ValueError(f"expected rows of {width} numbers ({what}), got {rows.shape}")
        z = torch.from_numpy(np.ascontiguousarray(rows[:, :latent]))
        y = None
        if conditional:
            digits = rows[:, latent]
            if not np.all((digits == np.round(digits)) & (digits >= 0) & (digits <= 9)):
                raise ValueError("the last column must hold digits 0-9")
            y = torch.from_numpy(digits.astype(np.int64))
        with torch.no_grad():
            return self.generator(z, y).numpy()  # (B, 1, 28, 28)


mlflow.models.set_model(GeneratorModel())
