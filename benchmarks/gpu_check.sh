#!/usr/bin/env bash
# The GPU check: on a machine with only PyTorch (and torchvision, PyYAML) installed, no pip
# install, no MLflow, no DVC, within about 8 minutes, each part in GPU_CHECK_PARTS (default all):
#   (info) print the GPU (nvidia-smi and torch);
#   step_variants: the step strategies (autograd, written-out, each eager or compiled, and the
#      compiled one with several steps per CUDA graph replay) side by side: their gradients
#      against autograd's, ms per step in the CUDA graph, kernels per step;
#   train_full, train_full_uncompiled, train_full_replays: train the configuration of
#      params.yaml for 100 epochs on the full MNIST, once per model in GPU_CHECK_MODELS (default
#      mlp), as configured, with train.compile false (for mlp, autograd's step uncompiled), and
#      with steps_per_replay=auto (several steps per CUDA graph replay): the training seconds,
#      the final sample grid, a hash of the weights and the trained networks (models/gan form,
#      for the evaluate stage to score elsewhere);
#   repeat: train as configured twice for 5 epochs: are the weights bit-identical run to run?
#   bench: the trainer against the tutorial baseline on CUDA (mlp and dcgan, batch 128);
#   step_profile: where a step's time goes (benchmarks/step_profile.py): FLOPs, achieved GFLOP/s
#      against a large GEMM, kernels per step (without the graph) and their GPU time;
#   evaluate_device: the reference and evaluate stages' scoring on the CPU and on the GPU:
#      seconds, and how far the GPU's metrics are from the CPU's;
#   fid_check, with GPU_CHECK_FID=1: FID of the fast path against the plain eager path, 2 seeds;
#   extras (GPU_CHECK_EXTRAS=0 skips them too): the variants the fast path was chosen from:
#      dcgan without channels_last, mlp at batch 1024.
# Every part runs under its own time bound, and a failing part does not stop the next one.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR] [MNIST_DIR]
#   OUT_DIR    results (default: $OUT, else bench/gpu_check): step_variants.json, full_MODEL/,
#              full_MODEL_uncompiled/ and full_MODEL_replays/ (train_full.json, samples.png,
#              gan/), repeat_1/ and repeat_2/ (train_full.json, samples.png), throughput.json,
#              step_profile.json, evaluate_device.json, fid_check.json, one .log per part,
#              summary.txt
#   MNIST_DIR  the four MNIST IDX files, decompressed or .gz (default: $MNIST_DATA, else
#              .gpucheck/mnist, else data/raw); relative paths start at the repository root
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for all parts, default 450),
#   GPU_CHECK_PARTS (space-separated part names), GPU_CHECK_MODELS (default mlp),
#   GPU_CHECK_FID=1 to run fid_check (GPU_CHECK_FID_CAP: its bound in seconds, default 150;
#   e.g. 100 epochs, 4 seeds a side, against the uncompiled step in the graph:
#   GPU_CHECK_FID_CAP=300 FID_ARGS="--epochs 100 --seeds 0,1,2,3 --eager-off compile"),
#   VARIANTS_ARGS / BENCH_ARGS / TRAIN_ARGS / PROFILE_ARGS /
#   EVAL_ARGS / FID_ARGS extra arguments per part, GPU_CHECK_DEVICE (default cuda; cpu only to
#   try the script's plumbing on a CPU machine).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/gpu_check}}
DATA=${2:-${MNIST_DATA:-}}
if [[ -z $DATA ]]; then
  if [[ -d .gpucheck/mnist ]]; then DATA=.gpucheck/mnist; else DATA=data/raw; fi
fi
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the library, without installing it
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
START=$SECONDS

note() { echo "== $*" | tee -a "$SUMMARY"; }

# part NAME CAP_SECONDS COMMAND...: run under min(CAP, what is left of the budget).
part() {
  local name=$1 cap=$2 left limit rc t0
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    note "$name: skipped (${left}s of the budget left)"
    return 0
  fi
  note "$name: starting, bounded to ${limit}s"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after $((SECONDS - t0))s"
  else
    note "$name: exit $rc after $((SECONDS - t0))s"
  fi
  return 0
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), data: $DATA, out: $OUT_DIR"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
else
  note "nvidia-smi: not found"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import sys, torch, torchvision
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch sees: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
else:
    print("torch sees no CUDA device")
import mnist_gan.training  # noqa: F401 - the library imports without installation
EOF

# want PART: whether GPU_CHECK_PARTS (default: every part) names PART.
want() { [[ " ${GPU_CHECK_PARTS:-$ALL_PARTS} " == *" $1 "* ]]; }
ALL_PARTS="step_variants train_full train_full_uncompiled train_full_replays repeat bench \
step_profile evaluate_device fid_check extras"
for asked in ${GPU_CHECK_PARTS:-}; do
  [[ " $ALL_PARTS " == *" $asked "* ]] || note "GPU_CHECK_PARTS: no part $asked (parts: $ALL_PARTS)"
done

# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
{
  if want step_variants; then
    part step_variants 200 "$PY" benchmarks/step_variants.py --data "$DATA" --device "$DEVICE" \
      --out "$OUT_DIR" ${VARIANTS_ARGS:-}
  fi
  for model in ${GPU_CHECK_MODELS:-mlp}; do
    if want train_full; then
      part "train_full_$model" 200 "$PY" benchmarks/train_full.py --data "$DATA" \
        --out "$OUT_DIR/full_$model" --save-gan "$OUT_DIR/full_$model/gan" \
        --set "model=$model" --device "$DEVICE" --time-limit 150 ${TRAIN_ARGS:-}
    fi
    if want train_full_uncompiled; then
      part "train_full_${model}_uncompiled" 200 "$PY" benchmarks/train_full.py --data "$DATA" \
        --out "$OUT_DIR/full_${model}_uncompiled" \
        --save-gan "$OUT_DIR/full_${model}_uncompiled/gan" --set "model=$model" \
        --set compile=false --device "$DEVICE" --time-limit 150 ${TRAIN_ARGS:-}
    fi
    if want train_full_replays; then
      part "train_full_${model}_replays" 200 "$PY" benchmarks/train_full.py --data "$DATA" \
        --out "$OUT_DIR/full_${model}_replays" --save-gan "$OUT_DIR/full_${model}_replays/gan" \
        --set "model=$model" --trainer-option steps_per_replay=auto --device "$DEVICE" \
        --time-limit 150 ${TRAIN_ARGS:-}
    fi
  done
  if want repeat; then
    for run in 1 2; do
      part "repeat_$run" 90 "$PY" benchmarks/train_full.py --data "$DATA" \
        --out "$OUT_DIR/repeat_$run" --epochs 5 --device "$DEVICE" ${TRAIN_ARGS:-}
    done
  fi
  if want bench; then
    part bench 200 "$PY" benchmarks/train_throughput.py --devices "$DEVICE" --models mlp,dcgan \
      --data "$DATA" --out "$OUT_DIR/throughput.json" ${BENCH_ARGS:-}
  fi
  if want step_profile; then
    part step_profile 90 "$PY" benchmarks/step_profile.py --device "$DEVICE" \
      --out "$OUT_DIR/step_profile.json" ${PROFILE_ARGS:-}
  fi
  if want evaluate_device; then
    part evaluate_device 120 "$PY" benchmarks/evaluate_device.py --data "$DATA" \
      --devices "cpu,$DEVICE" --out "$OUT_DIR" ${EVAL_ARGS:-}
  fi
  if want fid_check && [[ ${GPU_CHECK_FID:-0} == 1 ]]; then
    fid_cap=${GPU_CHECK_FID_CAP:-150}  # its training stops starting runs 50 s (or a third) early
    fid_limit=$((fid_cap > 150 ? fid_cap - 50 : fid_cap * 2 / 3))
    part fid_check "$fid_cap" "$PY" benchmarks/fid_check.py --data "$DATA" --out "$OUT_DIR" \
      --device "$DEVICE" --time-limit "$((fid_limit > 1 ? fid_limit : 1))" ${FID_ARGS:-}
  elif want fid_check; then
    note "fid_check: not asked for (GPU_CHECK_FID=1 runs it)"
  fi
  if want extras && [[ ${GPU_CHECK_EXTRAS:-1} == 1 ]]; then
    part bench_dcgan_nchw 90 "$PY" benchmarks/train_throughput.py --devices "$DEVICE" \
      --models dcgan --trainer-option channels_last=false --data "$DATA" \
      --out "$OUT_DIR/throughput_dcgan_nchw.json" ${BENCH_ARGS:-}
    part bench_mlp_b1024 90 "$PY" benchmarks/train_throughput.py --devices "$DEVICE" \
      --models mlp --batch-size 1024 --steps 100 --warmup 20 --data "$DATA" \
      --out "$OUT_DIR/throughput_mlp_b1024.json" ${BENCH_ARGS:-}
  fi
}

note "results"
"$PY" - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
for name in ("throughput", "throughput_dcgan_nchw", "throughput_mlp_b1024"):
    bench = load(f"{name}.json") or {}
    extra = {k: v for k, v in bench.items() if k in ("trainer_options", "batch_size")}
    for r in bench.get("results", []):
        print(f"{name} {r['device']} {r['model']} {extra}: baseline "
              f"{r['baseline']['images_per_sec']:,.0f} img/s, trainer "
              f"{r['trainer']['images_per_sec']:,.0f} img/s, ratio {r['ratio']}, GPU peak MiB "
              f"{r['baseline']['gpu_peak_mib']} / {r['trainer']['gpu_peak_mib']}, "
              f"compiled {r['trainer']['compiled']}")
for path in sorted(out.glob("full_*/train_full.json")):
    full = json.loads(path.read_text())
    print(f"train_full {path.parent.name}: {full['epochs_done']}/"
          f"{full['epochs_asked']} epochs in "
          f"{full['train_seconds']} s ({full['images_per_sec']:,.0f} img/s; first epoch "
          f"{full['first_epoch_seconds']} s, median epoch {full['median_epoch_seconds']} s) "
          f"on {full['device']}, {full.get('steps_per_replay')} steps per replay, compiled "
          f"{full['compiled']}, weights {full.get('weights_sha256', '?')[:12]}")
repeats = [load(f"repeat_{run}/train_full.json") for run in (1, 2)]
if all(repeats):
    hashes = [r.get("weights_sha256", "?")[:12] for r in repeats]
    print(f"repeat: {repeats[0]['epochs_done']} epochs twice, weights {hashes[0]} and "
          f"{hashes[1]}: bit-identical run to run: {hashes[0] == hashes[1]}")
variants = load("step_variants.json") or {}
for name, row in variants.get("speed", {}).items():
    agree = variants["agreement"]["by_strategy"].get(name, {})
    kern = variants.get("kernels", {}).get(name, {})
    print(f"step_variants {name}: {row['ms_per_step']} ms/step ({row['seconds_per_100_epochs']} s "
          f"per 100 epochs; warm-up {row['warmup_seconds']} s), gradients vs autograd "
          f"{agree.get('max_rel_grad_diff', float('nan')):.1e}, metrics "
          f"{agree.get('max_abs_metric_diff', float('nan')):.1e}; "
          f"{kern.get('kernels_per_step')} kernels/step ({kern.get('kernel_us_per_step')} us)")
profile = load("step_profile.json")
for r in (profile or {}).get("results", []):
    print(f"step_profile {r['model']}: {r['ms_per_step']} ms/step, {r['achieved_gflops']} GFLOP/s "
          f"(fp32 GEMM {profile['ceiling']['fp32_gflops']}, bf16 {profile['ceiling']['bf16_gflops']}); "
          f"eager {r.get('kernels_per_step')} kernels/step, {r.get('kernel_us_per_step')} us")
scoring = load("evaluate_device.json")
for r in (scoring or {}).get("results", []):
    diff = r.get("max_abs_diff_from_first")
    worst = max(diff.items(), key=lambda kv: kv[1]) if diff else None
    print(f"evaluate_device {r['device']}: reference {r['reference_seconds']} s, samples "
          f"{r['evaluate_seconds']} s; " + (f"largest difference from the CPU: {worst[0]} "
          f"{worst[1]:.2e}" if worst else "the base"))
fid = load("fid_check.json")
if fid:
    print(f"fid_check: {fid['summary']}; verdict {fid['verdict']}")
EOF
note "done in $((SECONDS - START))s"
