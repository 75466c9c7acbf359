"""Stage `train`: train the GAN on DATA/train.safetensors, tracked in MLflow, resumable.

Writes OUT (generator, discriminator and EMA generator as safetensors, config.json), METRICS
(final losses, train seconds, images per second), PLOTS/curves.json (one entry per epoch) and
PLOTS/samples.png. The MLflow run gets the params, the training data as a dataset (by its DVC
hash), one point per epoch, sample grids, the generator as a model, and the tag
generator_sha256 by which the evaluate stage finds it. Checkpoints go to CHECKPOINTS every
train.checkpoint_every epochs; run again after an interruption and training resumes there (same
params, data, device and code only) in the same MLflow run. If the tracking store stops
answering, the stage saves a checkpoint of the epoch it could not log and exits 1 with one line:
run it again once the store answers and the run continues, the missed epoch logged. A NaN or
infinite loss stops with an error naming the epoch and step, marks the run FAILED and exits 1,
keeping the last good checkpoint.

With train.nproc > 1 the stage starts that many copies of itself through torchrun's launcher
(DDP: gloo on the CPU, NCCL on GPUs) and waits for them; started by torchrun itself (several
machines), it takes its place from torchrun's variables. Rank 0 logs and writes everything; if
any process fails, all stop, and a rerun with the same nproc resumes from the last checkpoint.

How the step runs (train.amp, train.compile, train.cuda_graph) is chosen once, before the first
step, and logged as train.strategy. A `true` that cannot be met here (no CUDA for a graph, no
native bf16, torch.compile failing) stops the stage with one line and exit code 2, before
training or at the first step, where compiling or capturing the step fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import click
import mlflow
import registry
import torch
import tracking
from common import PARAMS_OPTION, code_digest, file_option, folder_option, load_or_exit
from torchvision.utils import save_image

from mnist_gan import distributed
from mnist_gan.checkpoint import CheckpointStore, fingerprint
from mnist_gan.data import DataError, load_normalized
from mnist_gan.models import GENERATOR_FILE
from mnist_gan.params import Params, params_to_dict
from mnist_gan.strategy import StrategyError, choose_strategy
from mnist_gan.training import DivergenceError, EpochStats, GANTrainer, fixed_noise
from mnist_gan.utils import (
    atomic_dir,
    atomic_path,
    resolve_device,
    set_threads,
    sha256_file,
    write_json,
)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files go, checkpoint stays


def _lost_tracking(exc: BaseException, trainer: GANTrainer, store: CheckpointStore,
                   run_id: str | None) -> NoReturn:  # fmt: skip
    """Keep the work (a checkpoint of the epoch reached) and stop with one line."""
    kept = "nothing was trained yet"
    if trainer.epoch and run_id:
        store.save(trainer.state_dict(), run_id=run_id)
        kept = f"epoch {trainer.epoch} is saved in {store.path}"
    tracking.give_up_quickly()
    uri = tracking.tracking_uri()
    # Logged in, but only to read (a READ user): the server refuses the run it would log into.
    if refused := tracking.refusal(uri, exc, f"EDIT on the experiment {tracking.EXPERIMENT}"):
        sys.exit(f"error: {refused}; {kept}")
    sys.exit(
        f"error: the MLflow tracking store {uri} failed ({tracking.short(exc)}); {kept}: run "
        "again once it answers, and training resumes in the same run"
    )


@click.command(help=__doc__)
@folder_option("--data", "Folder holding train.safetensors.")
@folder_option("--out", "GAN folder (replaced only on success).")
@file_option("--metrics", "JSON file for the final metrics.")
@folder_option("--plots", "Folder for curves.json and samples.png.")
@folder_option("--checkpoints", "Folder for checkpoints (not cached).")
@file_option("--run-id-file", "File that receives the MLflow run id.")
@PARAMS_OPTION
def main(data: Path, out: Path, metrics: Path, plots: Path, checkpoints: Path,
         run_id_file: Path, params_file: Path) -> None:  # fmt: skip
    """Train the GAN and log the run to MLflow."""
    params = load_or_exit(params_file)
    cfg = params.train
    threads = params.base.threads or os.cpu_count() or 1
    if cfg.nproc > 1 and not distributed.launched():  # start nproc copies of this stage
        paths = {"--data": data, "--out": out, "--metrics": metrics, "--plots": plots,
                 "--checkpoints": checkpoints, "--run-id-file": run_id_file,
                 "--params": params_file}  # fmt: skip
        argv = [str(x) for pair in paths.items() for x in pair]
        try:  # each process prints its own errors; this names the one that caused the stop
            distributed.launch(Path(__file__), argv, cfg.nproc, max(1, threads // cfg.nproc))
        except distributed.LaunchError as exc:
            if not exc.resumable:
                sys.exit(f"error: {exc}; its error is above")
            sys.exit(f"error: {exc}; a checkpoint, if one was saved, is kept in {checkpoints}: "
                     f"run again with train.nproc {cfg.nproc} to resume")  # fmt: skip
        return
    if distributed.launched():
        distributed.die_with_parent()  # never train on without the launcher
    try:
        world = distributed.world()
        # The machine's threads are shared by its training processes.
        set_threads(max(1, threads // world.local_size) if world.size > 1 else params.base.threads)
        device = distributed.init(world, resolve_device(params.base.device))
    except (RuntimeError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    try:
        _train(params, world, device, data, out, metrics, plots, checkpoints, run_id_file)
    finally:
        distributed.shutdown()


def _strategy_failed(exc: StrategyError) -> NoReturn:
    """An explicit train.amp/compile/cuda_graph that cannot be met: one line, exit code 2."""
    if mlflow.active_run() is not None:
        mlflow.end_run("FAILED")
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _lost_ranks(exc: RuntimeError, world: distributed.World) -> NoReturn:
    """A collective failed, most likely because another training process died: stop."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends it silently
    if world.main:
        mlflow.end_run("FAILED")
    click.echo(f"error: rank {world.rank} lost the other training processes: "
               f"{tracking.short(exc)}", err=True)  # fmt: skip
    sys.exit(distributed.STOPPED_WITH_OTHERS)


def _train(params: Params, world: distributed.World, device: torch.device, data: Path, out: Path,
           metrics: Path, plots: Path, checkpoints: Path, run_id_file: Path) -> None:  # fmt: skip
    cfg = params.train
    seed = params.base.seed if cfg.seed is None else cfg.seed  # the GAN's own seed, when set
    try:
        if world.main:
            tracking.check_reachable()  # a dead tracking server fails now, not after training
        images, labels = load_normalized(data / "train.safetensors")
        data_sha = sha256_file(data / "train.safetensors")
        progress = None if world.main else False  # one progress bar, rank 0's
        strategy = choose_strategy(cfg, device, world.size)  # once, before the first step

        def new_trainer() -> GANTrainer:
            return GANTrainer(cfg, images, labels=labels, seed=seed, device=device,
                              strategy=strategy, progress=progress)  # fmt: skip

        trainer = new_trainer()
    except StrategyError as exc:
        _strategy_failed(exc)
    except (DataError, RuntimeError, ValueError) as exc:
        if distributed.is_lost_peer(exc):
            _lost_ranks(exc, world)
        sys.exit(f"error: {exc}")
    code = code_digest(Path(__file__))  # every project file this stage runs
    parts = fingerprint(cfg, seed, data_sha, device.type, code, world.size,
                        strategy=str(strategy))  # fmt: skip
    store = CheckpointStore(checkpoints, parts)
    # Rank 0 reads the checkpoint and hands it to the others (who may be on other machines).
    state = distributed.broadcast_object(store.load() if world.main else None)
    if state is not None:
        failed = ""
        try:
            trainer.load_state_dict(state)
        except ValueError as exc:
            failed = str(exc)
        if distributed.any_rank(bool(failed)):  # a partial load may have changed the trainer
            why = failed or "another training process could not load it"
            store.note, state = f"{store.path}: not resumed from: {why}", None
            trainer = new_trainer()
    if not world.main:  # the other ranks train, and leave logging and outputs to rank 0
        try:
            trainer.fit()
        except StrategyError as exc:
            _strategy_failed(exc)
        except DivergenceError:
            # Rank 0 says why and exits (it never joins this barrier, which then fails); this
            # process waits for the launcher to stop it, so that the launcher names rank 0.
            with contextlib.suppress(RuntimeError):
                distributed.barrier()
            time.sleep(60)
            sys.exit(distributed.STOPPED_WITH_OTHERS)
        except KeyboardInterrupt:
            sys.exit(distributed.STOPPED_WITH_OTHERS)
        except RuntimeError as exc:
            if not distributed.is_lost_peer(exc):
                raise
            _lost_ranks(exc, world)
        return
    click.echo(store.note, err=True)
    # The grid: 8 x 8, or 10 x 10 for a conditional GAN, row r asking for digit r.
    rows = 10 if cfg.conditional else 8
    noise = fixed_noise(rows * rows, cfg.latent_dim, seed)
    digits = torch.arange(rows * rows) // rows if cfg.conditional else None
    every, run_id = cfg.sample_every, None

    def log_epoch(values: dict[str, float], with_grid: bool) -> None:
        epoch = int(values["epoch"])
        mlflow.log_metrics({k: v for k, v in values.items() if k != "epoch"}, step=epoch)
        if with_grid and (epoch == cfg.epochs or (every and epoch % every == 0)):
            grid = trainer.sample(noise, digits)
            tracking.log_image_grid(grid, key="samples", step=epoch, nrow=rows)

    def on_epoch(t: GANTrainer, stats: EpochStats) -> None:
        if stats.epoch > logged:
            log_epoch(stats.as_dict(), with_grid=True)
        losses = f"loss_d {stats.loss_d:.4f} loss_g {stats.loss_g:.4f}"
        click.echo(
            f"epoch {stats.epoch}/{cfg.epochs}: {losses} ({stats.epoch_seconds:.1f} s)", err=True
        )

    signal.signal(signal.SIGTERM, _terminate)
    try:
        resume = state.get("run_id") if state else None
        run, resumed = tracking.start_run("train", resume, system_metrics=True)
        run_id = run.info.run_id
        tracking.write_run_id(run_id_file, run_id)
        if not resumed:
            flat = tracking.flatten(
                {"base": params_to_dict(params.base), "train": params_to_dict(cfg)}
            )
            mlflow.log_params(
                {
                    **flat,
                    "data.train_sha256": data_sha,
                    "train.world_size": world.size,
                    "train.strategy": str(strategy),  # what runs: it never changes
                }
            )
            tracking.log_training_data(data, images)
        # A resumed run may lack the checkpoint's last epochs (the store stopped answering), or
        # already hold epochs after it (they run again, bit-identical on the CPU): log each once.
        logged = tracking.last_logged_step(run_id, "loss_d") if resumed else 0
        for values in trainer.history:
            if values["epoch"] > logged:
                log_epoch(values, with_grid=values["epoch"] == trainer.epoch)
        history = trainer.fit(on_epoch, store, {"run_id": run_id})
    except StrategyError as exc:
        _strategy_failed(exc)
    except DivergenceError as exc:
        mlflow.end_run("FAILED")
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it silently
        mlflow.end_run("KILLED")
        click.echo(f"interrupted in epoch {trainer.epoch + 1}; run again to resume "
                   f"({store.path})", err=True)  # fmt: skip
        # Under a launcher, SIGTERM means another process failed: that one is the cause.
        sys.exit(distributed.STOPPED_WITH_OTHERS if world.size > 1 else 1)
    except tracking.tracking_failures() as exc:
        _lost_tracking(exc, trainer, store, run_id)
    except RuntimeError as exc:
        if not distributed.is_lost_peer(exc):
            raise
        _lost_ranks(exc, world)

    with atomic_dir(out) as tmp:
        trainer.save(tmp)
    seconds = sum(h["epoch_seconds"] for h in history)
    seen = trainer.steps_per_epoch * cfg.batch_size * len(history)
    final = {k: history[-1][k] for k in ("loss_d", "loss_g", "d_real", "d_fake")}
    summary = {"epochs": len(history), "train_seconds": seconds, "images_per_sec": seen / seconds}
    write_json(metrics, {**final, **summary})
    write_json(plots / "curves.json", history)
    with atomic_path(plots / "samples.png") as tmp:
        grid = trainer.sample(noise, digits)  # (rows^2, 1, 28, 28), from the EMA generator if any
        save_image(grid, tmp, nrow=rows, normalize=True, value_range=(-1, 1), format="png")
    try:
        mlflow.log_metric("train_seconds", seconds)
        # The link from these weights to this run, by content (see tracking.find_generator_run).
        sha = sha256_file(out / GENERATOR_FILE)
        mlflow.set_tag(tracking.GENERATOR_TAG, sha)
        example = noise[:2] if digits is None else torch.cat([noise[:2], digits[:2, None]], 1)
        version = registry.log_generator_model(
            out, cfg.latent_dim, cfg.conditional, example.numpy(), sha, parts["params"]
        )
        mlflow.end_run()
    except tracking.tracking_failures() as exc:
        _lost_tracking(exc, trainer, store, run_id)
    store.clear()
    click.echo(f"trained {len(history)} epochs in {seconds:.1f} s into {out}; registered as "
               f"{registry.REGISTERED_MODEL} version {version}", err=True)  # fmt: skip


if __name__ == "__main__":
    main()
