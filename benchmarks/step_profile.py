"""Where a training step's time goes: FLOPs, achieved GFLOP/s against a large GEMM, kernels.

For each model (the train params of ``params.yaml``, batch 128 unless ``--batch-size``):

- ``flops_per_step``: the matmul and convolution FLOPs of one D+G step (forward and backward),
  counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eager step; elementwise work
  (activations, Adam, EMA) is not in it, so this is the compute a roofline charges;
- ``ms_per_step``: the trainer's own path (``GANTrainer.run_steps``: on CUDA the CUDA graph and
  bf16 autocast as configured), median of ``--repeats`` timed runs after a warm-up;
- ``achieved_gflops``: flops_per_step / step time;
- the roofline's ceiling, measured in the same process with the same threads: a large square
  matmul (``--gemm-size``) in float32 and in bfloat16 (AMX or AVX512-BF16 on CPUs that have
  them, tensor cores on GPUs; null on CPUs without them, which only emulate bf16), and the
  mlp's GEMMs of its own shapes alone (batch x 784 x 256 and so on) in the math the trainer
  uses (``gemm_dtype``: with ``amp``, bf16 operands on CUDA and in the CPU's written-out mlp
  step, float32 in oneDNN's bf16 math in the CPU's autograd step), which is what the step could
  reach if it did nothing but its matmuls;
- on CUDA: kernels launched per step run without the CUDA graph (compiled where
  ``train.compile``) and their summed GPU time (``torch.profiler``), to tell launch-bound steps
  (GPU idle between kernels) from compute-bound ones;
- on the CPU: where the step's time goes, op by op (``op_us_per_step``): each ATen op the step
  runs is timed through a Python dispatch mode and summed by kind (matmuls, the optimizer,
  dropout draws, the EMA, gradient norms, everything else). The mode adds a few microseconds
  to every op, so the kinds are read against each other and against ``ms_per_step_timed_ops``
  (the step under the mode), not against ``ms_per_step``.

Writes one JSON file (``--out``) and prints a table. Needs only PyTorch (no MLflow, no DVC).
Run ``python benchmarks/step_profile.py --help``.
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import BenchError, _sync, device_name, parse_set, train_config

from mnist_gan.params import TrainParams
from mnist_gan.training import GANTrainer, _cpu_bf16_math, amp_bf16
from mnist_gan.utils import resolve_device, write_json

# Steps per timed run, per device type and model (a run lasts about a second or two).
STEPS = {("cpu", "mlp"): 40, ("cpu", "dcgan"): 4, ("cuda", "mlp"): 1000, ("cuda", "dcgan"): 500}


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one untimed call)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                repeats: int) -> float:  # fmt: skip
    """GFLOP/s of (m x k) @ (k x n) in ``dtype``, repeated to last at least ~0.2 s per run."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    flops = 2.0 * m * k * n
    one = timed(lambda: torch.mm(a, b), device, 3)
    inner = max(1, int(0.2 / max(one, 1e-7)))

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    return flops * inner / timed(run, device, repeats) / 1e9


def model_gemms(cfg: TrainParams, batch: int, fuse_d: bool) -> list[tuple[int, int, int, int]]:
    """(m, k, n, times) of the mlp's forward GEMMs in a step, for the shapes-alone ceiling:
    G's once at ``batch`` rows; D's on real and fake (once at 2 x ``batch`` rows when the
    trainer judges them in one pass, else twice) and again on fake for G's update."""
    g_dims = [cfg.latent_dim, *cfg.hidden, 784]
    d_dims = [784, *cfg.hidden, 1]
    g = [(batch, k, n, 1) for k, n in zip(g_dims, g_dims[1:], strict=False)]
    d_pairs = list(zip(d_dims, d_dims[1:], strict=False))
    d_update = [(2 * batch, k, n, 1) if fuse_d else (batch, k, n, 2) for k, n in d_pairs]
    return g + d_update + [(batch, k, n, 1) for k, n in d_pairs]


def step_flops(trainer: GANTrainer) -> int:
    """Matmul/convolution FLOPs of one eager D+G step (forward and backward)."""
    b, cfg = trainer.batch_size, trainer.cfg
    batch = {"real": trainer.images[:b], "z": torch.randn(b, cfg.latent_dim)}
    if trainer.labels is not None:
        batch["y_real"] = trainer.labels[:b]
        batch["y_fake"] = trainer.labels[:b]
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    return int(counter.get_total_flops())


def profile_kernels(trainer: GANTrainer, device: torch.device, steps: int = 20,
                    top_n: int = 0) -> dict[str, Any]:  # fmt: skip
    """Kernels per step of ``trainer`` and their summed GPU time (microseconds), by
    torch.profiler, after 10 untimed steps; with ``top_n``, also the ``top_n`` kernels that take
    the most GPU time (per step: how many and how long)."""
    from torch.profiler import ProfilerActivity, profile

    trainer.run_steps(10)
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.run_steps(steps)
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels)  # microseconds
    row: dict[str, Any] = {"kernels_per_step": len(kernels) / steps,
                           "kernel_us_per_step": busy / steps}  # fmt: skip
    if top_n:
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.device_time)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top_n]
        row["top"] = [{"kernel": k[:120], "per_step": len(t) / steps,
                       "us_per_step": round(sum(t) / steps, 2)} for k, t in top]  # fmt: skip
    return row


def cuda_kernels(cfg: TrainParams, images: torch.Tensor, device: torch.device,
                 steps: int = 20) -> dict[str, float]:  # fmt: skip
    """Kernels per step run without the CUDA graph and their summed GPU time (microseconds)."""
    eager = dataclasses.replace(cfg, cuda_graph=False)  # compiled where cfg.compile
    trainer = GANTrainer(eager, images, seed=0, device=device, progress=False)
    return profile_kernels(trainer, device, steps)


# ATen ops by kind, for the CPU's op-by-op split (any other op counts as "other").
OP_KINDS = {
    "matmuls": ("mm", "addmm", "bmm", "convolution", "convolution_backward"),
    "optimizer": ("_fused_adam_", "_fused_adamw_", "_foreach_add_"),  # and opt.step()'s counters
    "dropout draws": ("random_",),
    "ema": ("_foreach_lerp_",),
    "gradient norms": ("_foreach_norm", "linalg_vector_norm"),
}


class _OpTimer(TorchDispatchMode):
    """Sums the wall time of every ATen op run under it, by kind (:data:`OP_KINDS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.kind = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        kind = self.kind.get(func.overloadpacket.__name__, "other")
        self.seconds[kind] = self.seconds.get(kind, 0.0) + elapsed
        self.count[kind] = self.count.get(kind, 0) + 1
        return out


def cpu_op_split(trainer: GANTrainer, steps: int) -> dict[str, Any]:
    """Microseconds per step by kind of op, ops per step by kind, and the step under the timer."""
    timer = _OpTimer()
    start = time.perf_counter()
    with timer:
        trainer.run_steps(steps)
    wall = (time.perf_counter() - start) / steps
    kinds = [*OP_KINDS, "other"]
    return {
        "op_us_per_step": {k: round(timer.seconds.get(k, 0.0) / steps * 1e6, 1) for k in kinds},
        "ops_per_step": {k: timer.count.get(k, 0) / steps for k in kinds},
        "ms_per_step_timed_ops": round(wall * 1e3, 3),
    }


def profile_model(args: argparse.Namespace, model: str, device: torch.device,
                  images: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    overrides = {**parse_set(args.overrides), "model": model, "batch_size": args.batch_size}
    cfg = train_config(args.params or None, overrides)
    # The FLOPs of the step as written, counted op by op (a compiled step does the same work).
    flops = step_flops(GANTrainer(dataclasses.replace(cfg, compile=False), images, seed=0,
                                  device=device, progress=False))  # fmt: skip
    trainer = GANTrainer(cfg, images, seed=0, device=device, progress=False)
    steps = args.steps or STEPS.get((device.type, model), 20)
    trainer.run_steps(max(5, steps // 5))  # warm-up (and the CUDA graph's capture)
    seconds = timed(lambda: trainer.run_steps(steps), device, args.repeats) / steps
    row: dict[str, Any] = {
        "model": model,
        "batch_size": cfg.batch_size,
        "flops_per_step": flops,
        "ms_per_step": round(seconds * 1e3, 4),
        "images_per_sec": round(cfg.batch_size / seconds, 1),
        "achieved_gflops": round(flops / seconds / 1e9, 2),
        "amp": trainer.amp,
        "cuda_graph": trainer.cuda_graph,
    }
    if model == "mlp":
        shapes = model_gemms(cfg, trainer.batch_size, trainer.fuse_d)
        fwd = sum(2.0 * m * k * n * times for m, k, n, times in shapes)
        # The trainer's math: bf16 autocast on CUDA; on a CPU, bf16 operands in the written-out
        # mlp step, oneDNN's bf16 math for float32 in the autograd step.
        bf16_operands = trainer.amp and (
            device.type == "cuda" or trainer.step_kind == "written_out"
        )
        dtype = torch.bfloat16 if bf16_operands else torch.float32
        row["gemm_dtype"] = "bf16" if bf16_operands else "fp32"
        with _cpu_bf16_math(trainer.cpu_bf16_math):
            per = [2.0 * m * k * n * times / gemm_gflops(m, k, n, dtype, device, args.repeats)
                   for m, k, n, times in shapes]  # fmt: skip
        row["model_gemms_alone_gflops"] = round(fwd / sum(per), 2)
    if device.type == "cuda":
        row.update(cuda_kernels(cfg, images, device))
    elif not trainer.compiled:  # op by op: a compiled step has no ATen ops to time
        row.update(cpu_op_split(trainer, steps))
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--models", default="mlp,dcgan", help="comma-separated")
    p.add_argument("--params", default="params.yaml", help="train params ('' for defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--steps", type=int, default=0, help="steps per timed run (0: per model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemm-size", type=int, default=0, help="square GEMM side (0: per device)")
    p.add_argument("--out", default="bench/step_profile.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        models = [m for m in args.models.split(",") if m]
        if unknown := set(models) - {"mlp", "dcgan"}:
            raise BenchError(f"--models: unknown {sorted(unknown)}")
    except (BenchError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Random images in [-1, 1]: the step's cost does not depend on the pixels.
    images = torch.rand(2048, 1, 28, 28) * 2 - 1
    side = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    ceiling: dict[str, Any] = {"gemm_size": side}
    # A CPU without AMX or AVX512-BF16 emulates bf16 matmuls at a fraction of a GFLOP/s
    # (measured 0.3 on an AVX2 AMD EPYC: minutes for one 2048^3 product), a GPU before Ampere
    # emulates them too: no ceiling to report.
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not amp_bf16(device):
            ceiling[f"{name}_gflops"] = None
            continue
        gflops = gemm_gflops(side, side, side, dtype, device, args.repeats)
        ceiling[f"{name}_gflops"] = round(gflops, 1)
    try:
        rows = [profile_model(args, m, device, images) for m in models]
    except (BenchError, ValueError) as exc:
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
        extra = ""
        if "model_gemms_alone_gflops" in r:
            extra += (f", its GEMMs alone {r['model_gemms_alone_gflops']:,} GFLOP/s "
                      f"({r['gemm_dtype']} operands)")  # fmt: skip
        if "kernels_per_step" in r:
            extra += (f", eager: {r['kernels_per_step']:.0f} kernels/step, "
                      f"{r['kernel_us_per_step']:.0f} us GPU time/step")  # fmt: skip
        if "op_us_per_step" in r:
            split = ", ".join(f"{k} {us / 1e3:.2f} ms ({r['ops_per_step'][k]:.0f} ops)"
                              for k, us in r["op_us_per_step"].items())  # fmt: skip
            extra += (f"\n  op by op (timed, {r['ms_per_step_timed_ops']:.2f} ms/step "
                      f"under the timer): {split}")  # fmt: skip
        print(f"{r['model']} batch {r['batch_size']}: {r['flops_per_step'] / 1e6:,.1f} MFLOP/step, "
              f"{r['ms_per_step']:.3f} ms/step, {r['achieved_gflops']:,} GFLOP/s achieved "
              f"({100 * r['achieved_gflops'] / ceiling['fp32_gflops']:.1f}% of fp32 GEMM"
              + (f", {100 * r['achieved_gflops'] / bf16:.1f}% of bf16)" if r["amp"] and bf16
                 else ")")
              + extra)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
