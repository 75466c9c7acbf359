"""The trained generator as an MLflow pyfunc model, logged as "models from code".

MLflow stores this file's source, not a pickled object, and the weights travel as the
``gan`` artifact (the ``models/gan`` folder: safetensors plus config.json). Loaded with
``mlflow.pyfunc.load_model(uri)``, ``predict(z)`` maps float32 z (B, latent_dim) to images
(B, 1, 28, 28) in [-1, 1], from the EMA generator when the folder has one.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class GeneratorModel(PythonModel):
    """z (B, latent_dim) -> images (B, 1, 28, 28) in [-1, 1]."""

    def load_context(self, context: Any) -> None:
        """Build the generator from the ``gan`` artifact folder."""
        from mnist_gan.models import load_generator

        self.generator, self.cfg = load_generator(context.artifacts["gan"], prefer_ema=True)

    # No type hints here on purpose: MLflow reads predict's hints as an input schema, and the
    # signature logged with the model already describes z.
    def predict(self, context, model_input, params=None):
        """Generate one image per row of ``model_input`` (an array or a DataFrame)."""
        z = torch.from_numpy(np.asarray(model_input, dtype=np.float32))  # (B, latent_dim)
        with torch.no_grad():
            return self.generator(z).numpy()  # (B, 1, 28, 28)


mlflow.models.set_model(GeneratorModel())
