"""Training under DDP on the CPU (gloo): 2 ranks train one model, on their shards, resumably.

The ranks run as spawned processes joined through a file store (tests/ddpkit.py); the launcher
tests start real ``torchrun`` worlds on localhost.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import ddpkit
import pytest
import torch

from mnist_gan import distributed
from mnist_gan.checkpoint import CheckpointStore, fingerprint
from mnist_gan.params import ParamsError, TrainParams, load_params
from mnist_gan.strategy import EAGER
from mnist_gan.training import GANTrainer


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("images_per_sec", "epoch_seconds")}
            for h in history]  # fmt: skip


def params_only(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without BatchNorm's running statistics (per rank on the CPU; training never reads them)."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in w.items() if not k.endswith(stats)}


def test_ranks_hold_shards_and_a_two_rank_run_resumes_exactly(tmp_path: Path) -> None:
    """The default recipe (BatchNorm, dropout, EMA) on 2 ranks: shards, one model, exact resume."""
    cfg = {"hidden": [32], "d_hidden": None, "batch_size": 32, "epochs": 2, "ema": 0.9}
    whole = ddpkit.spawn(ddpkit.fit_epochs, 2, tmp_path, cfg, None)
    images = ddpkit.blobs(240)
    for rank, r in enumerate(whole):
        assert torch.equal(r["images"], images[rank::2])  # its own shard, 120 images
        assert r["batch_size"] == 16 and r["steps_per_epoch"] == 7
    assert max_diff(params_only(whole[0]["weights"]), params_only(whole[1]["weights"])) == 0.0
    assert untimed(whole[0]["history"]) == untimed(whole[1]["history"])  # averaged over ranks
    assert len(whole[0]["state"]["rng_by_rank"]) == 2

    first = ddpkit.spawn(ddpkit.fit_epochs, 2, tmp_path, {**cfg, "epochs": 1}, None)
    checkpoint = tmp_path / "epoch1.pt"
    torch.save(first[0]["state"], checkpoint)  # what rank 0 saves, every rank's RNGs included
    resumed = ddpkit.spawn(ddpkit.fit_epochs, 2, tmp_path, cfg, str(checkpoint))
    # Bit-identical to the uninterrupted run: all of rank 0 (what is saved), and rank 1's weights
    # (its G BatchNorm statistics restart from rank 0's; no step reads them).
    assert max_diff(resumed[0]["weights"], whole[0]["weights"]) == 0.0
    assert max_diff(params_only(resumed[1]["weights"]), params_only(whole[1]["weights"])) == 0.0
    assert untimed(resumed[0]["history"]) == untimed(whole[0]["history"])


def test_a_batchnorm_discriminator_trains_on_two_ranks(tmp_path: Path) -> None:
    """The DCGAN paper's D (BatchNorm) runs twice before one backward: DDP must not touch its
    buffers."""
    cfg = {"model": "dcgan", "channels": 4, "batch_size": 16, "epochs": 1, "d_batchnorm": True}
    ranks = ddpkit.spawn(ddpkit.fit_epochs, 2, tmp_path, cfg, None)
    assert max_diff(params_only(ranks[0]["weights"]), params_only(ranks[1]["weights"])) == 0.0
    loss = ranks[0]["history"][0]["loss_d"]
    assert loss == loss and ranks[0]["steps_per_epoch"] == 15  # finite; 120 images / 8 a step
    # Each rank's D normalised its own images: their BatchNorm statistics differ.
    stats = [
        {k: v for k, v in r["weights"].items() if k.startswith("d.") and "running_mean" in k}
        for r in ranks
    ]
    assert stats[0].keys() and max_diff(stats[0], stats[1]) > 0


def test_the_r1_penalty_trains_one_model_on_two_ranks(tmp_path: Path) -> None:
    """R1's double backward runs through D under DDP: its share of D's gradients is averaged
    with the rest (the ranks' different shards would otherwise part their weights)."""
    cfg = {"hidden": [32], "d_hidden": None, "batch_size": 32, "epochs": 1, "r1_gamma": 1.0}
    ranks = ddpkit.spawn(ddpkit.fit_epochs, 2, tmp_path, cfg, None)
    assert max_diff(params_only(ranks[0]["weights"]), params_only(ranks[1]["weights"])) == 0.0
    plain = ddpkit.spawn(ddpkit.fit_epochs, 2, tmp_path, {**cfg, "r1_gamma": 0.0}, None)
    assert max_diff(params_only(ranks[0]["weights"]), params_only(plain[0]["weights"])) > 0


def test_a_batch_the_ranks_do_not_divide_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  batch_size: 130\n  nproc: 4\n")
    with pytest.raises(ParamsError, match=r"train\.batch_size: 130 does not split evenly"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  nproc: 0\n")
    with pytest.raises(ParamsError, match=r"train\.nproc: must be >= 1"):
        load_params(tmp_path / "params.yaml")


def test_a_checkpoint_of_another_world_size_is_not_resumed(tmp_path: Path) -> None:
    cfg = TrainParams(hidden=(16,), d_hidden=None, batch_size=32, epochs=1)
    trainer = GANTrainer(cfg, ddpkit.blobs(64), seed=0, progress=False, strategy=EAGER)
    CheckpointStore(
        tmp_path, fingerprint(cfg, 0, "d", "cpu", "c", world_size=2, strategy=str(EAGER))
    ).save(trainer.state_dict())
    store = CheckpointStore(
        tmp_path, fingerprint(cfg, 0, "d", "cpu", "c", world_size=1, strategy=str(EAGER))
    )
    assert store.load() is None
    assert "made with other world_size; not resumed from" in store.note


def test_world_reads_torchruns_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == distributed.World() and not distributed.launched()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.world() == distributed.World(3, 4, 1, 2) and distributed.launched()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent torchrun variables: RANK=4 WORLD_SIZE=4"):
        distributed.world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        distributed.world()


def test_rank_seeds() -> None:
    assert distributed.rank_seed(5, 0) == 5  # rank 0 draws what one process draws
    seeds = {distributed.rank_seed(s, r) for s in range(4) for r in range(1, 4)}
    assert len(seeds) == 12 and not seeds & set(range(8))
    assert all(0 <= s < 2**63 for s in seeds)


def test_the_ranks_split_the_batch_or_refuse(tmp_path: Path) -> None:
    """Without a process group the trainer is one rank with the whole batch."""
    cfg = TrainParams(hidden=(16,), d_hidden=None, batch_size=32, nproc=2)
    t = GANTrainer(cfg, ddpkit.blobs(64), seed=0, progress=False, strategy=EAGER)
    assert (t.rank, t.world_size, t.batch_size) == (0, 1, 32)
    assert torch.equal(t.images, ddpkit.blobs(64))


SCRIPT = Path(__file__).with_name("failing_rank.py")


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder as this process's temp dir (where the launcher makes its folders)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize(
    ("how", "message", "resumable"),
    [
        ("exit", "training process 1 of 2 failed (exit code 3)", False),
        ("kill", "training process 1 of 2 was killed by SIGKILL", True),
        ("together", "the 2 training processes stopped together", True),
    ],
)
def test_launch_names_the_process_that_failed(
    how: str, message: str, resumable: bool, private_tmp: Path
) -> None:
    """The cause, not a process that stopped because of it (exit code 75)."""
    assert distributed.STOPPED_WITH_OTHERS == 75  # what failing_rank.py uses
    with pytest.raises(distributed.LaunchError, match=f"^{re.escape(message)}$") as info:
        distributed.launch(SCRIPT, [how], nproc=2, threads=1)
    assert info.value.resumable is resumable
    assert list(private_tmp.iterdir()) == []  # the launcher's log folder went with the run


def test_launch_runs_every_rank(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, private_tmp: Path
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    distributed.launch(SCRIPT, ["ok"], nproc=2, threads=1)
    captured = capfd.readouterr()
    assert "rank 0 of 2 done" in captured.out and "rank 1 of 2 done" in captured.out
    assert "OMP_NUM_THREADS" not in os.environ  # set for the processes only
    assert captured.err == ""  # the launcher's own log stays quiet
    # torchrun alone leaves a torchelastic_* folder in the temp dir after every run.
    assert list(private_tmp.iterdir()) == []
