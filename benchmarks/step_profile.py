"""Where a training step's time goes: FLOPs, achieved GFLOP/s against a large GEMM, and the
step's ops (CPU) or kernels (CUDA), all through the trainer's public ``fit``.

For each model (the train params of ``params.yaml``, batch 128 unless ``--batch-size``), with
the strategy the params choose on the device (``choose_strategy``, as the train stage does):

- the images: random ones in [-1, 1] (a step's cost does not depend on the pixels);
- ``flops_per_step``: the matmul and convolution FLOPs of one step (forward and backward
  passes), counted by ``torch.utils.flop_counter.FlopCounterMode`` over a one-step epoch of the
  eager step; elementwise work (activations, Adam, the EMA) is not in it, so this is the compute
  a roofline charges;
- ``ms_per_step``: a trainer whose epoch is ``--steps`` steps, after one warm-up epoch (which
  compiles and captures where the strategy does), the median of ``--repeats`` epochs;
- ``achieved_gflops``: flops_per_step / step time, against the ceiling measured in the same
  process with the same threads: a large square matmul (``--gemm-size``) in float32 and, where
  the device computes it natively, bfloat16;
- on the CPU, ``ms_by_kind``: one epoch under ``torch.profiler``, each op's own time (without
  the ops it calls) summed by kind (matmuls, dropout draws, the optimizer, the EMA, gradient
  norms, autograd's engine, everything else), per step, with the calls per step;
- on CUDA, the kernels one step launches and their summed GPU time, run without the CUDA graph
  (compiled where the strategy compiles), to tell a launch-bound step (the GPU idle between
  kernels) from a compute-bound one, and the kernels that take the most of it.

Writes one JSON file (``--out``) and prints a table. Needs only PyTorch (no MLflow, no DVC).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from benchkit import (
    BenchError,
    device_name,
    epoch_trainer,
    run_settings,
    strategy_for,
    sync,
    timed_epochs,
)
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mnist_gan.params import TrainParams
from mnist_gan.strategy import EAGER, Strategy
from mnist_gan.training import GANTrainer
from mnist_gan.utils import native_bf16, resolve_device, write_json

# Steps per timed epoch, per device type and model (an epoch lasts about a second or two).
STEPS = {("cpu", "mlp"): 40, ("cpu", "dcgan"): 4, ("cuda", "mlp"): 1000, ("cuda", "dcgan"): 500}
# The kinds of the CPU's ops, matched in order against the profiler's event names; the rest
# are "other". Autograd's engine: its bookkeeping around each backward function.
OP_KINDS: dict[str, Callable[[str], bool]] = {
    "matmuls": lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm") or "conv" in n,
    "dropout draws": lambda n: n in ("aten::uniform_", "aten::bernoulli_", "aten::native_dropout"),
    "optimizer": lambda n: n.startswith(("Optimizer.", "aten::_fused_adam", "aten::_foreach_")),
    "ema": lambda n: n == "aten::lerp_",
    "gradient norms": lambda n: n == "aten::linalg_vector_norm",
    "autograd engine": lambda n: "Backward" in n or "autograd::" in n or "AccumulateGrad" in n,
}


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one untimed call)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_gflops(side: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """GFLOP/s of a (side x side) @ (side x side) matmul in ``dtype``, repeated to last at
    least ~0.2 s per timed run."""
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    one = timed(lambda: torch.mm(a, b), device, 3)
    inner = max(1, int(0.2 / max(one, 1e-7)))

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    return 2.0 * side**3 * inner / timed(run, device, repeats) / 1e9


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP is counted as Global's.

    The tracker hooks each module's inputs that require grad, and its hook fails inside
    ``torch.autograd.grad`` when such an input is a leaf ("A leaf node was passed to
    _will_engine_execute_node"): R1's gradient through a D that judges the real batch in a
    pass of its own (BatchNorm, spectral norm). The total needs no tracker.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def step_flops(cfg: TrainParams, images: torch.Tensor, device: torch.device) -> int:
    """Matmul and convolution FLOPs of one eager step (forward and backward passes)."""
    trainer = epoch_trainer(cfg, images, 1, strategy=EAGER, device=device)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        trainer.fit(epochs=1)
    return int(counter.get_total_flops())


def cpu_ops(trainer: GANTrainer, steps: int) -> dict[str, Any]:
    """Milliseconds per step by kind of op (each op's own time) and calls per step, over one
    epoch of ``steps`` steps under ``torch.profiler``, and that epoch's milliseconds per step
    (the profiler's overhead included: the kinds add up to about that)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (seconds,) = timed_epochs(trainer)
    ms: dict[str, float] = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    calls: dict[str, int] = dict.fromkeys(ms, 0)
    for event in prof.key_averages():
        kind = next((k for k, match in OP_KINDS.items() if match(event.key)), "other")
        ms[kind] += event.self_cpu_time_total / 1e3
        calls[kind] += event.count
    return {"ms_by_kind": {k: round(v / steps, 3) for k, v in ms.items()},
            "calls_by_kind": {k: v / steps for k, v in calls.items()},
            "ms_per_step_profiled": round(seconds / steps * 1e3, 3)}  # fmt: skip


def cuda_kernels(trainer: GANTrainer, steps: int, top_n: int = 15) -> dict[str, Any]:
    """Kernels per step and their summed GPU time (microseconds) over one epoch of ``steps``
    steps under ``torch.profiler``, and the ``top_n`` kernels that take the most of it."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_epochs(trainer)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top_n]
    return {
        "kernels_per_step": len(kernels) / steps,
        "kernel_us_per_step": round(sum(e.device_time for e in kernels) / steps, 1),
        "top_kernels": [
            {"kernel": k[:120], "per_step": len(t) / steps, "us_per_step": round(sum(t) / steps, 2)}
            for k, t in top
        ],  # fmt: skip
    }


def profile_model(cfg: TrainParams, images: torch.Tensor, device: torch.device, steps: int,
                  repeats: int) -> dict[str, Any]:  # fmt: skip
    """One model's row: FLOPs, speed, and where the time goes."""
    strategy = strategy_for(cfg, device)
    flops = step_flops(cfg, images, device)
    trainer = epoch_trainer(cfg, images, steps, strategy=strategy, device=device)
    timed_epochs(trainer)  # the warm-up epoch: compiles and captures where the strategy does
    seconds = statistics.median(timed_epochs(trainer, repeats)) / steps
    row: dict[str, Any] = {
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "strategy": str(strategy),
        "flops_per_step": flops,
        "ms_per_step": round(seconds * 1e3, 4),
        "images_per_sec": round(cfg.batch_size / seconds, 1),
        "achieved_gflops": round(flops / seconds / 1e9, 2),
    }
    if device.type == "cuda":  # the kernels, one by one: without the graph
        plain: Strategy = dataclasses.replace(strategy, cuda_graph=False)
        unrolled = epoch_trainer(cfg, images, min(steps, 20), strategy=plain, device=device)
        timed_epochs(unrolled)
        row.update(cuda_kernels(unrolled, min(steps, 20)))
    else:
        row.update(cpu_ops(trainer, steps))
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--params", default="params.yaml", help="train params ('' for the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train param (repeatable)")  # fmt: skip
    p.add_argument("--out", default="bench/step_profile.json", help="JSON results file")
    p.add_argument("--models", default="mlp,dcgan", help="comma-separated")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--steps", type=int, default=0, help="steps per timed epoch (0: per model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemm-size", type=int, default=0, help="square GEMM side (0: per device)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        models = [m for m in args.models.split(",") if m]
        if unknown := set(models) - {"mlp", "dcgan"}:
            raise BenchError(f"--models: unknown {sorted(unknown)}")
        configs = [run_settings(args, model=m, batch_size=args.batch_size) for m in models]
    except (BenchError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    steps_most = max(args.steps or STEPS.get((device.type, m), 20) for m in models)
    # Random images in [-1, 1]: the step's cost does not depend on the pixels.
    images = torch.rand(steps_most * args.batch_size, 1, 28, 28) * 2 - 1
    side = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    ceiling: dict[str, Any] = {"gemm_size": side}
    # A device that only emulates bf16 (an AVX2 CPU: minutes for one 2048^3 product) has no
    # bf16 ceiling to report.
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        native = dtype == torch.float32 or native_bf16(device)
        ceiling[f"{name}_gflops"] = (round(gemm_gflops(side, dtype, device, args.repeats), 1)
                                     if native else None)  # fmt: skip
    try:
        rows = [profile_model(cfg, images, device, args.steps or STEPS.get((device.type,
                cfg.model), 20), args.repeats) for cfg in configs]  # fmt: skip
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads if device.type == "cpu" else None,
        "ceiling": ceiling,
        "results": rows,
    }
    write_json(args.out, report)
    bf16 = ceiling["bf16_gflops"]
    print(f"{report['device']}, {args.threads if device.type == 'cpu' else 'GPU'} thread(s): "
          f"{side}^3 GEMM fp32 {ceiling['fp32_gflops']:,} GFLOP/s, "
          + (f"bf16 {bf16:,} GFLOP/s" if bf16 is not None else "bf16 not native here"))  # fmt: skip
    for r in rows:
        share = 100 * r["achieved_gflops"] / ceiling["fp32_gflops"]
        print(f"{r['model']} batch {r['batch_size']} ({r['strategy']}): "
              f"{r['flops_per_step'] / 1e6:,.1f} MFLOP/step, {r['ms_per_step']:.3f} ms/step, "
              f"{r['achieved_gflops']:,} GFLOP/s ({share:.1f}% of the fp32 GEMM)")  # fmt: skip
        if "ms_by_kind" in r:
            print(f"  profiled, {r['ms_per_step_profiled']:.2f} ms/step: " + ", ".join(
                f"{k} {ms:.2f} ms ({r['calls_by_kind'][k]:.0f} calls)"
                for k, ms in r["ms_by_kind"].items()))  # fmt: skip
        if "kernels_per_step" in r:
            print(f"  without the graph: {r['kernels_per_step']:.0f} kernels/step, "
                  f"{r['kernel_us_per_step']:.0f} us GPU time/step")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
