"""The trainer's step strategies side by side on one device: do they agree, and how fast is each?

The strategies (:class:`mnist_gan.training.GANTrainer`'s step and runner, as chosen by
``--trainer-option step=...`` and ``train.compile``; on CUDA each runs as one CUDA graph when
``train.cuda_graph`` is on, as by default):

- ``autograd``: :func:`~mnist_gan.step.gan_step`, autograd's backward;
- ``autograd_compiled``: the same with its forward passes compiled (``train.compile``);
- ``written_out``: :class:`~mnist_gan.mlp_step.MLPStep`, the mlp step's backward written out;
- ``written_out_compiled``: the same compiled as a whole (``train.compile``);
- ``written_out_compiled_replays``: the same, several steps per CUDA graph replay
  (``steps_per_replay="auto"``: 13 for MNIST; the others replay one step at a time).

1. **Agreement.** In float32 without dropout (the strategies draw dropout masks differently),
   from the same weights: each weight's gradient in the first step against the ``autograd``
   strategy's (``||g - g_autograd|| / ||g_autograd||``; float32 rounding gives about 1e-6, a
   wrong gradient order 1), then the largest difference of the METRICS (losses, D's
   probabilities, gradient norms) over ``--check-steps`` steps on the same batches.
2. **Speed.** The train params as configured (bf16 and dropout included), ``--steps`` steps per
   timed run after a warm-up that compiles and captures (its seconds are reported), median of
   ``--repeats`` runs, strategies alternating; milliseconds per step and what 100 epochs of
   468 steps would take at that pace.
3. **Kernels** (CUDA only): kernels launched per step, and their summed GPU time, of each
   strategy run without the CUDA graph (``torch.profiler``), and the kernels that take the most
   of it; and whether a compiled function's random numbers (the compiled step's dropout masks)
   are new at every replay of a CUDA graph that captured it.

Writes ``step_variants.json`` into ``--out`` and prints a table. Needs only PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from step_profile import profile_kernels
from train_throughput import (
    BenchError,
    _sync,
    device_name,
    resolve_raw_dir,
    run_parser,
    run_settings,
)

from mnist_gan.data import DataError, normalize, read_raw_split
from mnist_gan.params import TrainParams
from mnist_gan.training import GANTrainer
from mnist_gan.utils import resolve_device, write_json

# name: (GANTrainer's step option, train.compile, its steps_per_replay option)
STRATEGIES = {
    "autograd": ("autograd", False, 1),
    "autograd_compiled": ("autograd", True, 1),
    "written_out": ("written_out", False, 1),
    "written_out_compiled": ("written_out", True, 1),
    "written_out_compiled_replays": ("written_out", True, "auto"),
}
STEPS_PER_EPOCH = 60_000 // 128


def build(cfg: TrainParams, name: str, images: torch.Tensor, device: torch.device,
          options: dict[str, Any] | None = None) -> GANTrainer:  # fmt: skip
    """A trainer of strategy ``name`` (seed 0: the same initial weights for every strategy),
    with GANTrainer ``options`` beside those the strategy sets."""
    step, compiled, replay = STRATEGIES[name]
    run_cfg = dataclasses.replace(cfg, compile=compiled)
    return GANTrainer(run_cfg, images, seed=0, device=device, progress=False,
                      **{**(options or {}), "step": step, "steps_per_replay": replay})  # fmt: skip


def _grads(t: GANTrainer) -> dict[str, torch.Tensor]:
    nets = {"g": t.generator, "d": t.discriminator}
    return {f"{n}.{k}": p.grad.detach().float().cpu().clone() for n, net in nets.items()
            for k, p in net.named_parameters()}  # fmt: skip


def agreement(cfg: TrainParams, names: list[str], images: torch.Tensor, device: torch.device,
              steps: int, options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Each strategy against ``autograd``: the first step's gradients (from the same weights),
    then the metrics of ``steps`` steps on the same batches."""
    exact = dataclasses.replace(cfg, amp=False, d_dropout=0.0, cuda_graph=False)
    gen = torch.Generator().manual_seed(1)
    batches = [
        {"real": images[i * exact.batch_size : (i + 1) * exact.batch_size],
         "z": torch.randn(exact.batch_size, exact.latent_dim, generator=gen)}
        for i in range(steps)
    ]  # fmt: skip
    grads, metrics = {}, {}
    for name in ["autograd", *[n for n in names if n != "autograd"]]:
        t = build(exact, name, images, device, options)
        rows = [t.train_step(batches[0]).cpu()]
        grads[name] = _grads(t)
        rows += [t.train_step(b).cpu() for b in batches[1:]]
        metrics[name] = torch.stack(rows)
        print(f"agreement: {name} trained {steps} steps (step {t.step_kind}, compiled "
              f"{t.compiled})", file=sys.stderr)  # fmt: skip
    ref = grads["autograd"]
    scale = max(g.norm() for g in ref.values())
    out: dict[str, Any] = {"steps": steps, "by_strategy": {}}
    for name in names:
        # ||g - g_ref|| / ||g_ref|| per weight; gradients that are zero but for rounding (a bias
        # before BatchNorm, which the normalisation cancels) are compared at the largest norm.
        rel = {k: float((g - ref[k]).norm() / max(ref[k].norm(), 1e-3 * scale))
               for k, g in grads[name].items()}  # fmt: skip
        worst = max(rel, key=rel.get)
        out["by_strategy"][name] = {
            "max_rel_grad_diff": rel[worst],
            "worst_weight": worst,
            "max_abs_metric_diff": float((metrics[name] - metrics["autograd"]).abs().max()),
            "finite": bool(torch.isfinite(metrics[name]).all()),
        }
    return out


def speed(cfg: TrainParams, names: list[str], images: torch.Tensor, device: torch.device,
          steps: int, warmup: int, repeats: int,
          options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Milliseconds per step of each strategy, median of ``repeats`` alternating runs. Each
    strategy warms up and times whole replays: its step counts are rounded up to a multiple of
    its steps per replay."""
    trainers, rows = {}, {}
    for name in names:
        start = time.perf_counter()
        t = trainers[name] = build(cfg, name, images, device, options)
        whole = lambda n, k=t.steps_per_replay: -(-n // k) * k  # noqa: E731
        t.run_steps(whole(warmup))  # compiles (where asked) and captures the CUDA graph
        _sync(device)
        rows[name] = {"warmup_seconds": round(time.perf_counter() - start, 2),
                      "step": t.step_kind, "compiled": t.compiled, "amp": t.amp,
                      "cuda_graph": t.cuda_graph, "steps_per_replay": t.steps_per_replay,
                      "steps": whole(steps), "runs_ms": []}  # fmt: skip
        print(f"speed: {name} warmed up in {rows[name]['warmup_seconds']} s", file=sys.stderr)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            n = rows[name]["steps"]
            start = time.perf_counter()
            trainers[name].run_steps(n)
            _sync(device)
            rows[name]["runs_ms"].append(round((time.perf_counter() - start) / n * 1e3, 4))
    for row in rows.values():
        row["ms_per_step"] = statistics.median(row["runs_ms"])
        row["seconds_per_100_epochs"] = round(row["ms_per_step"] * STEPS_PER_EPOCH * 100 / 1e3, 2)
    return rows


def kernels(cfg: TrainParams, names: list[str], images: torch.Tensor, device: torch.device,
            options: dict[str, Any], steps: int = 20,
            top_n: int = 25) -> dict[str, Any]:  # fmt: skip
    """Kernels per step and their GPU time (microseconds) of each strategy without the graph,
    and its ``top_n`` costliest kernels."""
    out = {}
    for name in names:
        if STRATEGIES[name][2] != 1:  # without the graph, the same kernels as one step a replay
            continue
        t = build(dataclasses.replace(cfg, cuda_graph=False), name, images, device, options)
        row = profile_kernels(t, device, steps, top_n)
        row["kernel_us_per_step"] = round(row["kernel_us_per_step"], 1)
        out[name] = row
    return out


def compiled_rng_per_replay(device: torch.device) -> bool:
    """Whether a compiled function's random numbers are new at each replay of a CUDA graph that
    captured it (as the compiled step's dropout masks must be): three replays, all different."""
    from mnist_gan.runners import capture_cuda_graph, side_stream

    fn = torch.compile(lambda x: x * (torch.rand_like(x) >= 0.5), dynamic=False, fullgraph=True)
    x = torch.ones(4096, device=device)
    out: dict[str, torch.Tensor] = {}
    with side_stream(device):  # as the trainer warms up before a capture
        for _ in range(2):
            fn(x)  # compiles

    def body() -> None:
        out["y"] = fn(x)

    replay = capture_cuda_graph(body)
    draws = []
    for _ in range(3):
        replay()
        draws.append(out["y"].clone())
    return all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = run_parser(__doc__, "folder for step_variants.json")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    p.add_argument("--check-steps", type=int, default=20,
                   help="steps of the agreement check (0: no check)")  # fmt: skip
    p.add_argument("--steps", type=int, default=0, help="steps per timed run (0: 2000 on CUDA)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.strategies.split(",") if n]
    try:
        unknown = sorted(set(names) - set(STRATEGIES))
        if unknown:
            raise BenchError(f"--strategies: unknown {unknown}; known: {sorted(STRATEGIES)}")
        device = resolve_device(args.device)
        cfg, options = run_settings(args)
        if {"step", "steps_per_replay"} & set(options):
            raise BenchError("--trainer-option: step and steps_per_replay are the strategies' own")
        with tempfile.TemporaryDirectory(prefix="mnist-variants-") as scratch:
            pixels = read_raw_split(resolve_raw_dir(args.data, Path(scratch)), "train")[0]
        images = normalize(pixels[: args.train_limit or None])
    except (BenchError, DataError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    steps = args.steps or (2000 if device.type == "cuda" else 20)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "train_params": {
            "model": cfg.model,
            "batch_size": cfg.batch_size,
            "amp": cfg.amp,
            "cuda_graph": cfg.cuda_graph,
            "d_dropout": cfg.d_dropout,
        },  # fmt: skip
        "trainer_options": options,
        "agreement": agreement(cfg, names, images, device, args.check_steps, options)
        if args.check_steps
        else {"steps": 0, "by_strategy": {}},
        "speed": speed(cfg, names, images, device, steps, args.warmup, args.repeats, options),
    }
    if device.type == "cuda":
        report["kernels"] = kernels(cfg, names, images, device, options)
        try:
            report["compiled_rng_new_per_replay"] = compiled_rng_per_replay(device)
        except Exception as exc:  # a finding to report, not a reason to lose the rest
            report["compiled_rng_new_per_replay"] = f"failed: {type(exc).__name__}: {exc}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "step_variants.json", report)
    print(f"{report['device']}, torch {report['torch']}, {steps} steps per run")
    for name in names:
        a = report["agreement"]["by_strategy"].get(name, {"max_rel_grad_diff": float("nan")})
        s = report["speed"][name]
        k = report.get("kernels", {}).get(name, {})
        print(
            f"{name:28s} {s['ms_per_step']:8.4f} ms/step  100 epochs "
            f"{s['seconds_per_100_epochs']:7.2f} s  warm-up {s['warmup_seconds']:6.2f} s  grads "
            f"vs autograd {a['max_rel_grad_diff']:.1e}  kernels "
            f"{k.get('kernels_per_step', '-')} ({k.get('kernel_us_per_step', '-')} us)"
        )
    if "kernels" in report:
        print(f"compiled random numbers new at each graph replay: "
              f"{report['compiled_rng_new_per_replay']}")  # fmt: skip
        profiled = [n for n in names if n in report["kernels"]]
        if profiled:
            print(f"{profiled[-1]}: the kernels taking the most GPU time, per step")
            for row in report["kernels"][profiled[-1]]["top"]:
                print(f"  {row['us_per_step']:7.2f} us  {row['per_step']:5.2f} x  {row['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
