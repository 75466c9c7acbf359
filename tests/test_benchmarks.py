"""The benchmark scripts on tiny synthetic MNIST files, on the CPU."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import conftest
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnist_gan.data import RAW_FILES, normalize, read_raw_split
from mnist_gan.models import load_generator, read_config
from mnist_gan.params import TrainParams
from mnist_gan.strategy import EAGER, Strategy

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# Small networks, so a step takes milliseconds.
SETTINGS = ("hidden=[32,32]", "d_hidden=null", "channels=4", "latent_dim=8")
TINY = [arg for setting in SETTINGS for arg in ("--set", setting)]
CPU_AUTO = str(conftest.CPU_AUTO)  # what auto runs on this CPU, in words


def write_idx(folder: Path, n_train: int = 96, n_test: int = 20, gz: bool = False) -> Path:
    """Four tiny IDX files (random pixels, labels 0-9) in ``folder``, plain or gzipped."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = RAW_FILES[split]
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        blobs = {
            images_name: struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes(),
            labels_name: struct.pack(">II", 2049, n) + labels.tobytes(),
        }
        for name, blob in blobs.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
    return folder


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """The benchmark modules, imported the way the scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCH))
    import baseline
    import benchkit
    import fid_check
    import train_full
    import train_throughput

    return SimpleNamespace(baseline=baseline, benchkit=benchkit, fid_check=fid_check,
                           train_full=train_full, tp=train_throughput)  # fmt: skip


def test_no_benchmark_imports_a_private_name() -> None:
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_gan"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
                assert not any(part.startswith("_") for part in node.module.split("."))
        assert not re.search(r"mnist_gan(\.\w+)*\._", path.read_text()), path.name


def test_benchmark_script_writes_table_and_json(tmp_path: Path) -> None:
    raw = write_idx(tmp_path / "raw")
    out = tmp_path / "bench" / "throughput.json"
    cmd = [sys.executable, str(BENCH / "train_throughput.py"), "--devices", "cpu",
           "--models", "mlp,dcgan", "--steps", "3", "--warmup", "1", "--repeats", "2",
           "--batch-size", "16", "--data", str(raw), "--out", str(out), "--params", "",
           "--no-compile-check", *TINY]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ratio" in res.stdout and "cpu    mlp" in res.stdout and "cpu    dcgan" in res.stdout
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["batch_size"] == 16
    assert report["train_params"]["mlp"]["hidden"] == [32, 32]
    assert [(r["device"], r["model"]) for r in report["results"]] == [
        ("cpu", "mlp"),
        ("cpu", "dcgan"),
    ]
    for row in report["results"]:
        base, fast = row["baseline"], row["trainer"]
        assert len(base["images_per_sec_runs"]) == len(fast["images_per_sec_runs"]) == 2
        assert base["images_per_sec"] > 0 and fast["images_per_sec"] > 0
        runs = zip(fast["images_per_sec_runs"], base["images_per_sec_runs"], strict=True)
        ratios = sorted(t / b for t, b in runs)
        assert row["ratio"] == pytest.approx(sum(ratios) / 2, abs=0.011)  # median of two
        assert len(row["ratio_runs"]) == 2 and row["rss_peak_mib"] > 0
        assert fast["strategy"] == CPU_AUTO  # what auto chooses on the CPU
        assert "compiled_vs_eager" not in row and "compile_flipped" not in row  # not asked for
        # 1 warm-up step + 2 repeats of 3: every step drew a loader batch and read two losses.
        assert base["steps"] == base["batches_loaded"] == 7
        assert base["item_calls"] == 14


# What compiling adds is measured without R1, whose double backward cannot be compiled.
NO_R1 = ["--set", "r1_gamma=0"]


def bench_mlp_once(bench, tmp_path: Path, *extra: str) -> list[dict]:
    """``make bench``'s rows for the tiny mlp on the CPU: one run of 2 steps per loop."""
    raw = write_idx(tmp_path / "raw")
    out = tmp_path / "throughput.json"
    args = ["--devices", "cpu", "--models", "mlp", "--steps", "2", "--warmup", "1",
            "--repeats", "1", "--batch-size", "16", "--data", str(raw), "--out", str(out),
            "--params", "", *TINY, *extra]  # fmt: skip
    assert bench.tp.main(args) == 0
    return json.loads(out.read_text())["results"]


@pytest.mark.slow  # compiles the step on the CPU
def test_benchmark_reports_what_compiling_adds(bench, tmp_path: Path, capsys) -> None:
    (row,) = bench_mlp_once(bench, tmp_path, *NO_R1)
    assert row["trainer"]["strategy"] == CPU_AUTO
    assert row["compile_flipped"]["strategy"] == CPU_AUTO.replace("eager", "compiled")
    assert row["compile_flipped"]["images_per_sec"] > 0 and row["compiled_vs_eager"] > 0
    table = capsys.readouterr().out
    assert "compiled/eager" in table and f"{row['compiled_vs_eager']:.2f}" in table


def test_benchmark_reports_a_compile_failure_and_measures_the_rest(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def broken_compile(fn=None, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("no C++ compiler here")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    (row,) = bench_mlp_once(bench, tmp_path, *NO_R1)
    assert row["compiled_vs_eager"] is None and row["ratio"] > 0
    assert "train.compile" in row["compile_flipped"]["error"]
    printed = capsys.readouterr().out
    assert "failed" in printed and "no C++ compiler here" in printed


def test_benchmark_with_r1_says_why_it_does_not_compile(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The default's R1 penalty cannot be compiled: the compiled run is not tried, and the row
    and the printout say why and how to measure it."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled with R1"))
    (row,) = bench_mlp_once(bench, tmp_path)  # TrainParams' defaults: r1_gamma 0.1
    assert row["compiled_vs_eager"] is None and row["ratio"] > 0
    assert "r1_gamma=0" in row["compile_flipped"]["error"]
    printed = capsys.readouterr().out
    assert "not measured" in printed and "double backward" in printed


def test_baseline_adds_the_r1_penalty_the_params_ask_for(bench, tmp_path: Path) -> None:
    """Like for like with the trainer: the tutorial loop's D loss holds R1's term too."""
    raw = write_idx(tmp_path / "raw")
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4, batch_size=16, d_dropout=0.0)
    losses = []
    for gamma in (0.0, 100.0):
        base = bench.baseline.BaselineTrainer(
            dataclasses.replace(cfg, r1_gamma=gamma), raw, torch.device("cpu"), seed=0
        )
        base.run(1)
        base.close()
        losses.append(base.losses_d[0])
    assert losses[1] > losses[0] + 1e-3  # the same batch, weights and noise, plus the penalty


def test_epoch_trainer_times_whole_epochs_through_fit(bench) -> None:
    kit = bench.benchkit
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4, batch_size=8, channels=4)
    images = torch.rand(40, 1, 28, 28) * 2 - 1
    trainer = kit.epoch_trainer(cfg, images, 3, strategy=EAGER)
    assert trainer.steps_per_epoch == 3 and trainer.strategy == EAGER
    seconds = kit.timed_epochs(trainer, 2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert trainer.epoch == 2 and [h["epoch"] for h in trainer.history] == [1, 2]
    with pytest.raises(kit.BenchError, match="6 steps of batch 8 need 48 images"):
        kit.epoch_trainer(cfg, images, 6, strategy=EAGER)


@pytest.mark.slow  # four worlds of spawned processes
def test_ddp_scaling_benchmark_times_both_worlds(tmp_path: Path) -> None:
    raw = write_idx(tmp_path / "raw", n_train=128)
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, str(BENCH / "ddp_scaling.py"), "--steps", "3", "--repeats", "2",
           "--data", str(raw), "--out", str(out), "--set", "batch_size=16", *TINY]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ratio 2 processes / 1:" in res.stdout
    report = json.loads(out.read_text())
    assert [(r["processes"], r["threads_each"]) for r in report["rows"]] == [(1, 2), (2, 1)]
    assert all(len(r["runs"]) == 2 and r["images_per_sec"] > 0 for r in report["rows"])
    assert report["ratio"] == pytest.approx(sorted(report["ratios"])[0] / 2
                                            + sorted(report["ratios"])[1] / 2)  # fmt: skip
    bad = subprocess.run([*cmd[:-2], "--set", "batch_size=15", "--set", "d_minibatch_std=0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "batch_size 15 does not split across 2" in bad.stderr


def test_baseline_is_the_tutorial_loop(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline = bench.baseline
    raw = write_idx(tmp_path / "raw", n_train=40)
    calls = {"item": 0}
    real_item = torch.Tensor.item

    def counting_item(self: torch.Tensor):
        calls["item"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4, batch_size=16)
    trainer = baseline.BaselineTrainer(cfg, raw)
    try:
        loader = trainer.loader
        assert isinstance(loader, DataLoader) and loader.batch_size == 16 and loader.drop_last
        assert isinstance(loader.dataset, datasets.MNIST)
        kinds = [type(t) for t in loader.dataset.transform.transforms]
        assert kinds == [transforms.ToTensor, transforms.Normalize]
        # The tutorial transform scales exactly as the project's normalize stage.
        first, _ = loader.dataset[0]
        expected = normalize(read_raw_split(raw, "train")[0][:1])[0]
        torch.testing.assert_close(first, expected)
        before = [p.detach().clone() for p in trainer.generator.parameters()]
        trainer.run(5)  # 40 images, batch 16: two batches an epoch, so this crosses epochs
    finally:
        trainer.close()
    assert trainer.steps_done == trainer.batches_loaded == 5
    assert calls["item"] >= 10 and trainer.item_calls == 10
    assert len(trainer.losses_d) == len(trainer.losses_g) == 5
    assert all(np.isfinite(trainer.losses_d + trainer.losses_g))
    after = list(trainer.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_torchvision_layout_needs_all_four_files(bench, tmp_path: Path) -> None:
    baseline = bench.baseline
    raw = write_idx(tmp_path / "raw")
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        baseline.torchvision_root(raw, tmp_path / "tv")


def test_data_resolution_gz_and_mirror_fallback(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tp = bench.benchkit
    mirror = write_idx(tmp_path / "mirror", gz=True)
    plain = write_idx(tmp_path / "plain")
    scratch = tmp_path / "scratch"
    # An explicit folder of .gz files is decompressed into the scratch folder.
    got = tp.resolve_raw_dir(mirror, scratch)
    assert got.parent == scratch
    for split in RAW_FILES:
        a, b = read_raw_split(got, split), read_raw_split(plain, split)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # No data/raw here: the MNIST_MIRROR folder is used (a file:// URL; http entries skipped).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", f"https://example.invalid/x/,file://{mirror}")
    assert tp.resolve_raw_dir(None, tmp_path / "scratch2") == tmp_path / "scratch2" / "raw"
    # data/raw wins when it exists.
    write_idx(tmp_path / "data" / "raw")
    assert tp.resolve_raw_dir(None, tmp_path / "scratch3") == Path("data/raw")


def test_bad_input_is_a_clear_error(bench, tmp_path: Path, capsys) -> None:
    tp = bench.tp
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.json"
    assert tp.main(["--data", str(empty), "--out", str(out), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "train-images-idx3-ubyte" in err
    assert not out.exists()
    assert tp.main(["--data", str(empty), "--out", str(out), "--set", "nope=1"]) == 2
    assert "--set 'nope=1'" in capsys.readouterr().err
    assert tp.main(["--data", str(empty), "--out", str(out), "--set", "lr_g=-1"]) == 2
    assert "lr_g" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.main(["--models", "resnet"])
    # An explicit true this device cannot meet: the strategy's one-line error, before any work.
    raw = write_idx(tmp_path / "raw")
    args = ["--data", str(raw), "--out", str(out), "--devices", "cpu", "--models", "mlp",
            "--batch-size", "16", "--params", "", "--set", "cuda_graph=true", *TINY]  # fmt: skip
    assert tp.main(args) == 2
    assert "train.cuda_graph: true needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_train_full_writes_grid_and_stops_at_time_limit(bench, tmp_path: Path) -> None:
    raw = write_idx(tmp_path / "raw")
    out = tmp_path / "out"
    args = ["--data", str(raw), "--out", str(out), "--device", "cpu", "--params", "",
            "--set", "batch_size=32", "--epochs", "3", "--time-limit", "1e-9", *TINY,
            "--save-gan", str(tmp_path / "gan")]  # fmt: skip
    assert bench.train_full.main(args) == 0
    report = json.loads((out / "train_full.json").read_text())
    assert report["epochs_done"] == 1 and report["epochs_asked"] == 3
    assert report["strategy"] == CPU_AUTO  # auto, on the CPU
    assert len(report["weights_sha256"]) == 64
    assert report["stopped_at_time_limit"] is True
    assert report["train_seconds"] > 0 and report["images_per_sec"] > 0
    assert report["first_epoch_seconds"] > 0 and report["later_epochs_seconds"] == 0
    assert np.isfinite(report["final"]["loss_d"]) and report["final"]["epoch"] == 1
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2)  # save_image's 2-pixel padding
    # The trained networks, in the form the evaluate stage loads.
    generator, cfg = load_generator(tmp_path / "gan", prefer_ema=True)
    assert cfg.hidden == (32, 32) and cfg.batch_size == 32
    with torch.no_grad():
        assert generator(torch.zeros(2, cfg.latent_dim)).shape == (2, 1, 28, 28)


def test_train_full_trains_every_epoch_and_refuses_a_strategy_it_cannot_run(
    bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = write_idx(tmp_path / "raw")
    base = ["--data", str(raw), "--device", "cpu", "--params", "", "--set", "batch_size=32",
            "--epochs", "2", *TINY]  # fmt: skip
    assert bench.train_full.main([*base, "--out", str(tmp_path / "ok")]) == 0
    report = json.loads((tmp_path / "ok" / "train_full.json").read_text())
    assert report["epochs_done"] == 2 and report["stopped_at_time_limit"] is False
    assert report["final"]["epoch"] == 2 and report["later_epochs_seconds"] > 0
    out = tmp_path / "out"
    assert bench.train_full.main([*base, "--out", str(out), "--set", "cuda_graph=true"]) == 2
    assert "train.cuda_graph: true needs a CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_step_profile_counts_flops_and_splits_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import step_profile

    out = tmp_path / "profile.json"
    args = ["--device", "cpu", "--params", "", "--models", "mlp", "--steps", "2",
            "--repeats", "1", "--gemm-size", "64", "--out", str(out), *NO_R1, *TINY]  # fmt: skip
    assert step_profile.main(args) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["strategy"] == CPU_AUTO
    # Without R1's double backward: G 8-32-32-784 and D 784-32-32-1 at batch 128 (D's last
    # layer also takes the minibatch std's feature, 33 inputs; that feature is no matmul): forward
    # 2*b*sum(k*n); backward adds at most twice that (weight and input gradients; fewer where
    # none are needed: z's, the real batch's, D's weights in G's update), so the count lies
    # strictly between 2x and 3x.
    g = 8 * 32 + 32 * 32 + 32 * 784
    d = 784 * 32 + 32 * 32 + 33 * 1
    fwd = 2 * 128 * (g + 3 * d)  # G once; D on real, fake, and fake again for G's update
    assert 2 * fwd < row["flops_per_step"] < 3 * fwd
    assert row["ms_per_step"] > 0 and row["achieved_gflops"] > 0
    assert report["ceiling"]["fp32_gflops"] > 0
    # The CPU's split of the step by kind of op: every kind the mlp's step runs is there (the
    # dropout masks, fused Adam for both networks, the EMA, the gradient norms).
    calls, ms = row["calls_by_kind"], row["ms_by_kind"]
    assert calls["matmuls"] >= 9 and calls["dropout draws"] > 0 and calls["optimizer"] >= 2
    assert calls["ema"] > 0 and calls["gradient norms"] >= 2 and calls["autograd engine"] > 0
    assert all(v >= 0 for v in ms.values()) and ms["matmuls"] > 0
    # Each op's own time, summed, cannot exceed the profiled epoch's wall time.
    assert sum(ms.values()) <= row["ms_per_step_profiled"] * 1.05
    assert step_profile.main([*args[: -len(TINY)], "--models", "bogus"]) == 2


@pytest.mark.parametrize("native", [True, False])
def test_step_profile_measures_a_bf16_ceiling_only_where_the_device_has_bf16(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # An AVX2-only CPU emulates bf16 matmuls at ~0.3 GFLOP/s: a 2048^3 product took minutes.
    monkeypatch.syspath_prepend(str(BENCH))
    import step_profile

    monkeypatch.setattr(step_profile, "native_bf16", lambda device: native)
    out = tmp_path / "profile.json"
    args = ["--device", "cpu", "--params", "", "--models", "mlp", "--steps", "1",
            "--repeats", "1", "--gemm-size", "32", "--out", str(out), *TINY]  # fmt: skip
    assert step_profile.main(args) == 0
    ceiling = json.loads(out.read_text())["ceiling"]
    assert ceiling["fp32_gflops"] > 0
    first_line = capsys.readouterr().out.splitlines()[0]
    if native:
        assert ceiling["bf16_gflops"] > 0 and "bf16 not native" not in first_line
    else:
        assert ceiling["bf16_gflops"] is None and "bf16 not native here" in first_line


def test_eager_variant_turns_the_strategys_switches_off(bench) -> None:
    variant_strategy = bench.fid_check.variant_strategy
    fast = Strategy(amp=True, compile=True, cuda_graph=True)
    assert variant_strategy(fast, "fast") == fast
    assert variant_strategy(fast, "eager") == EAGER
    # --eager-off compile: the uncompiled step, with bf16 and the CUDA graph
    assert variant_strategy(fast, "eager", ["compile"]) == Strategy(amp=True, cuda_graph=True)


def test_fid_verdict_compares_the_gap_with_the_seeds_spread(bench) -> None:
    summarise = bench.fid_check.summarise

    def runs(eager: list[float], fast: list[float]) -> list[dict]:
        return [{"variant": "eager", "fid": f} for f in eager] + [
            {"variant": "fast", "fid": f} for f in fast
        ]

    # Means 10.5 and 11.0: a gap of 0.5, within eager's spread of 1.0.
    summary, verdict = summarise(runs([10.0, 11.0], [10.9, 11.1]))
    assert summary["eager"] == {"mean": 10.5, "spread": 1.0, "n": 2}
    assert verdict == {"gap": 0.5, "spread": 1.0, "same": True}
    # Means 10.5 and 14.0: a gap of 3.5, above both spreads (1.0 and 0.2).
    _, verdict = summarise(runs([10.0, 11.0], [13.9, 14.1]))
    assert verdict == {"gap": 3.5, "spread": 1.0, "same": False}
    # One seed of a variant has no spread to compare with: no verdict.
    assert summarise(runs([10.0, 11.0], [10.5]))[1] is None


def test_gpu_check_script_parses() -> None:
    res = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True)
    assert res.returncode == 0, res.stderr
    assert os.access(BENCH / "gpu_check.sh", os.X_OK)


@pytest.mark.slow
def test_gpu_check_plumbing_on_cpu(tmp_path: Path, bench) -> None:
    """The whole script, on the CPU with tiny settings: every part runs and reports."""
    raw = write_idx(tmp_path / "raw", n_train=64, n_test=64, gz=True)
    out = tmp_path / "gpu"
    tiny = " ".join(TINY)
    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_FID": "1",
        # Every part but the uncompiled training (train_full's plumbing again, with one param).
        "GPU_CHECK_PARTS": "train_full bench train_full_eager repeat step_profile "
        "evaluate_device fid_check",
        "PYTHON": sys.executable,
        "BENCH_ARGS": f"--steps 2 --warmup 1 --repeats 1 --batch-size 16 --no-compile-check {tiny}",
        "GPU_CHECK_MODELS": "mlp",
        "TRAIN_ARGS": f"--epochs 1 --set batch_size=16 {tiny}",
        "PROFILE_ARGS": f"--models mlp --steps 2 --repeats 1 --gemm-size 64 {tiny}",
        "EVAL_ARGS": "--samples 40 --k 3 --is-splits 2 --kid-subsets 2",
        "FID_ARGS": f"--epochs 1 --seeds 0,1 --samples 50 --classifier-epochs 1 "
        f"--set batch_size=16 {tiny}",
    }
    res = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out), str(raw)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = (out / "summary.txt").read_text()
    for part in ("train_full_mlp", "bench", "train_full_mlp_eager", "repeat_1", "repeat_2",
                 "step_profile", "evaluate_device", "fid_check"):  # fmt: skip
        assert f"{part}: exit 0" in summary, summary
    assert "train_full_mlp_uncompiled" not in summary  # not asked for
    for name in ("full_mlp", "full_mlp_eager"):
        assert f"train_full {name}: 1/1 epochs in " in summary, summary
    assert CPU_AUTO in summary and "100 epochs at the median pace: " in summary
    assert "bit-identical run to run: True" in summary  # on the CPU, run to run
    for model in ("mlp", "dcgan"):
        assert f"bench cpu {model}: baseline " in summary
    assert "compiled/eager not measured" in summary  # --no-compile-check
    assert f"step_profile mlp ({CPU_AUTO}): " in summary
    # The same computation on the same device twice: the same numbers.
    scoring = [line for line in summary.splitlines() if line.startswith("evaluate_device cpu:")]
    assert len(scoring) == 2 and scoring[0].endswith("the base"), summary
    assert "largest difference from the CPU: " in scoring[1] and scoring[1].endswith(" 0.00e+00")
    assert (out / "full_mlp" / "samples.png").is_file()
    assert read_config(out / "full_mlp" / "gan")[0].model == "mlp"
    assert not (out / "full_mlp_eager" / "gan").exists()  # only the full runs save theirs
    fid = json.loads((out / "fid_check.json").read_text())
    assert fid["strategies"] == {"eager": str(EAGER), "fast": CPU_AUTO}
    assert [(r["variant"], r["seed"]) for r in fid["runs"]] == [
        ("eager", 0),
        ("fast", 0),
        ("eager", 1),
        ("fast", 1),
    ]
    summary, verdict = bench.fid_check.summarise(fid["runs"])
    assert fid["summary"] == summary and fid["verdict"] == verdict and verdict is not None


def test_no_benchmark_module_shadows_a_stage_module() -> None:
    """Tests import both folders' scripts by bare name into one process: a shared name (say
    ``common``) would hand a stage the benchmarks' module."""
    stages = {p.stem for p in (BENCH.parent / "pipeline").glob("*.py")}
    assert not stages & {p.stem for p in BENCH.glob("*.py")}
