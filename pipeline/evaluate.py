"""Stage `evaluate`: judge the generator's samples beside what real data gets.

Draws evaluate.num_samples images from GAN (the EMA weights when present) with base.seed, and
scores them with the classifier in CLASSIFIER: FID and KID against the test set, Inception Score,
precision, recall, density and coverage (k = evaluate.k), mode coverage (modes, class_kl) and
memorisation (memorized_fraction, nn_ratio). Every metric also gets its real-data reference,
prefixed real_, from REFERENCE (the reference stage computes real data's side once for these
settings; this stage scores only the samples). A conditional generator is asked for every digit
equally often and also gets label_accuracy: the share of samples the classifier calls the digit
asked for (its reference: the classifier's test accuracy). Writes METRICS (flat JSON) and under
PLOTS: samples.png, per_digit.png and nearest_train.png. Logs all of it into the MLflow run that
trained these weights, found in the tracking store by the generator's SHA-256 (RUN_ID_FILE, the
id train last wrote, only breaks a tie). When the store has no such run (the model came through
DVC's cache from elsewhere), it logs into a new run tagged stage=evaluate and with that SHA-256,
and says so. The metrics are linked to the logged model behind each registered version of those
weights (where the promotion gate reads them); the headline ones also go onto the versions as
tags, for the UI.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import mlflow
import registry
import tracking
from common import PARAMS_OPTION, file_option, folder_option, load_or_exit

from mnist_gan.classifier import WEIGHTS_FILE, load_classifier
from mnist_gan.data import DataError, load_normalized
from mnist_gan.figures import class_grid, neighbour_figure, sample_grid, save_png
from mnist_gan.metrics import check_reference, evaluate_samples
from mnist_gan.models import GENERATOR_FILE, load_generator
from mnist_gan.params import params_to_dict
from mnist_gan.reference import load_reference, reference_settings, reference_sources
from mnist_gan.sampling import balanced_labels, generate_samples
from mnist_gan.utils import (
    atomic_dir,
    resolve_device,
    seed_everything,
    set_threads,
    sha256_file,
    write_json,
)


@click.command(help=__doc__)
@folder_option("--data", "Folder holding train/test.safetensors.")
@folder_option("--gan", "GAN folder written by the train stage.")
@folder_option("--classifier", "Classifier folder (classifier stage).")
@folder_option("--reference", "Real-data reference folder (reference stage).")
@file_option("--metrics", "JSON file for the metrics.")
@folder_option("--plots", "Folder for the figures (replaced on success).")
@file_option("--run-id-file", "File holding the train run's MLflow id.")
@PARAMS_OPTION
def main(data: Path, gan: Path, classifier: Path, reference: Path, metrics: Path, plots: Path,
         run_id_file: Path, params_file: Path) -> None:  # fmt: skip
    """Score the GAN in GAN against the data in DATA."""
    params = load_or_exit(params_file)
    cfg, seed = params.evaluate, params.base.seed
    try:
        tracking.check_reachable()
        set_threads(params.base.threads)
        device = resolve_device(params.base.device)
        train_images, _ = load_normalized(data / "train.safetensors")
        test_images, _ = load_normalized(data / "test.safetensors")
        evaluator = load_classifier(classifier)
        real = load_reference(reference, train_images, test_images, device)
        settings = reference_settings(train_images, test_images, k=cfg.k,
                                      num_samples=cfg.num_samples, is_splits=cfg.is_splits,
                                      seed=seed)  # fmt: skip
        try:  # before any sampling: it fits these settings and this classifier
            check_reference(real, evaluator, settings)
        except ValueError as exc:
            raise ValueError(f"{reference}: {exc}") from None
        found = reference_sources(classifier / WEIGHTS_FILE, data / "train.safetensors",
                                  data / "test.safetensors")  # fmt: skip
        stale = [name for name, sha in found.items() if real.sources.get(name) != sha]
        if stale:
            raise ValueError(f"{reference} was computed from another {' and '.join(stale)} "
                             "than these: compute it again (dvc repro reference)")  # fmt: skip
        generator, gan_cfg = load_generator(gan, prefer_ema=True, device=device)
        sha = sha256_file(gan / GENERATOR_FILE)  # the weights' identity, for the MLflow run
    except (DataError, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"error: {exc}")

    seed_everything(seed)
    # A conditional generator is asked for every digit equally often, and judged on whether
    # the classifier sees the digit asked for (label_accuracy).
    digits = balanced_labels(cfg.num_samples) if gan_cfg.conditional else None
    samples = generate_samples(generator, cfg.num_samples, latent_dim=gan_cfg.latent_dim,
                               seed=seed, batch_size=cfg.batch_size, device=device,
                               labels=digits)  # fmt: skip
    start = time.perf_counter()
    try:
        result = evaluate_samples(samples, evaluator, real, is_splits=cfg.is_splits, seed=seed,
                                  batch_size=cfg.batch_size, labels=digits)  # fmt: skip
    except (RuntimeError, ValueError) as exc:  # e.g. samples that hold NaN
        sys.exit(f"error: {exc}")
    seconds = time.perf_counter() - start
    scores, flat = result.samples, result.flat()

    with atomic_dir(plots) as tmp:
        save_png(sample_grid(samples), tmp / "samples.png")
        save_png(class_grid(samples, scores.predictions), tmp / "per_digit.png")
        neighbours = train_images[scores.nn_train_index]
        figure = neighbour_figure(samples, neighbours, scores.nn_train_dist, result.threshold)
        save_png(figure, tmp / "nearest_train.png")
    write_json(metrics, flat)
    click.echo(
        "\n".join(f"{k:>19}: {flat[k]:<10g} real: {flat['real_' + k]:g}" for k in scores.metrics),
        err=True,
    )
    click.echo(f"scored {cfg.num_samples} samples in {seconds:.1f} s (real data: {reference})",
               err=True)  # fmt: skip

    run_id = tracking.find_generator_run(sha, hint=tracking.read_run_id(run_id_file))
    run, resumed = tracking.start_run("evaluate", run_id, tags={tracking.GENERATOR_TAG: sha})
    if not resumed:
        click.echo(f"note: no run in {tracking.tracking_uri()} trained {gan / GENERATOR_FILE} "
                   f"(sha256 {sha[:12]}...); logging into a new run {run.info.run_id} "
                   "(stage=evaluate)", err=True)  # fmt: skip
    # Tags, not params: a train run keeps its id when only evaluate's params change, and
    # MLflow refuses to change a logged param.
    settings = {**tracking.flatten({"evaluate": params_to_dict(cfg)}), "base.seed": seed}
    with run:
        mlflow.set_tags(settings)
        shares = scores.counts.double() / scores.counts.sum()
        logged = {**flat, **{f"class_share_{d}": float(s) for d, s in enumerate(shares)},
                  "evaluate_seconds": seconds}  # fmt: skip
        registry.log_model_metrics(run.info.run_id, logged, registry.model_ids(sha))
        mlflow.log_artifact(str(metrics), artifact_path="evaluate")
        mlflow.log_artifacts(str(plots), artifact_path="evaluate")
    # The registered version of these weights carries its headline metrics (for the UI), the
    # evaluator that measured them and how (two versions compare fairly only when both match).
    headline = {k: flat[k] for k in registry.HEADLINE_METRICS if k in flat}
    evaluator_sha = sha256_file(classifier / WEIGHTS_FILE)
    registry.tag_model_versions(sha, {**headline, **settings, "classifier_sha256": evaluator_sha})


if __name__ == "__main__":
    main()
