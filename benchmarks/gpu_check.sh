#!/usr/bin/env bash
# The GPU check: on a machine with only PyTorch (and torchvision, PyYAML) installed, no pip
# install, no MLflow, no DVC, within about 8 minutes, each part in GPU_CHECK_PARTS (default all,
# in this order):
#   (info) print the GPU (nvidia-smi and torch);
#   train_full: train the configuration of params.yaml for 100 epochs on the full MNIST, once
#      per model in GPU_CHECK_MODELS (default mlp), with the strategy the params choose (auto on
#      CUDA: bf16, the step compiled and in a CUDA graph where train.r1_gamma is 0; with the
#      default's R1 penalty neither): the training seconds (the goal: under 10 s for the mlp on
#      one H100), the final sample grid, a hash of the weights and the trained networks
#      (models/gan form, for the evaluate stage to score elsewhere);
#   bench: the trainer against the tutorial baseline on CUDA (mlp and dcgan, batch 128), and
#      the trainer compiled against uncompiled (benchmarks/train_throughput.py);
#   train_full_uncompiled: the same 100 epochs with train.compile false (the CUDA graph and bf16
#      kept): what compiling adds over a whole run;
#   train_full_graph: the same 100 epochs with train.cuda_graph true: whether the R1 penalty's
#      double backward can be captured (auto does not try it until this part has passed), and
#      what the graph adds to it;
#   train_full_eager: 5 epochs of the plain eager float32 step (amp, compile and cuda_graph
#      false): its pace, and what 100 epochs would take at it;
#   repeat: train as configured twice for 3 epochs: are the weights bit-identical run to run?
#   step_profile: where a step's time goes (benchmarks/step_profile.py): FLOPs, achieved GFLOP/s
#      against a large GEMM, kernels per step (without the graph) and their GPU time;
#   evaluate_device: the reference and evaluate stages' scoring on the CPU and on the GPU:
#      seconds, and how far the GPU's metrics are from the CPU's;
#   fid_check, with GPU_CHECK_FID=1: FID of the chosen strategy against the plain eager step.
# Every part runs under its own time bound, and a failing part does not stop the next one.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR] [MNIST_DIR]
#   OUT_DIR    results (default: $OUT, else bench/gpu_check): full_MODEL/, full_MODEL_uncompiled/,
#              full_MODEL_graph/ and full_MODEL_eager/ (train_full.json, samples.png; gan/ for
#              the first three),
#              repeat_1/ and repeat_2/, throughput.json, step_profile.json,
#              evaluate_device.json, fid_check.json, one .log per part, summary.txt
#   MNIST_DIR  the four MNIST IDX files, decompressed or .gz (default: $MNIST_DATA, else
#              .gpucheck/mnist, else data/raw); relative paths start at the repository root
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for all parts, default 450),
#   GPU_CHECK_PARTS (space-separated part names), GPU_CHECK_MODELS (default mlp),
#   GPU_CHECK_FID=1 to run fid_check (GPU_CHECK_FID_CAP: its bound in seconds, default 150),
#   BENCH_ARGS / TRAIN_ARGS / PROFILE_ARGS / EVAL_ARGS / FID_ARGS extra arguments per part,
#   GPU_CHECK_DEVICE (default cuda; cpu only to try the script's plumbing on a CPU machine).
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
ALL_PARTS="train_full bench train_full_uncompiled train_full_graph train_full_eager repeat \
step_profile evaluate_device fid_check"
for asked in ${GPU_CHECK_PARTS:-}; do
  [[ " $ALL_PARTS " == *" $asked "* ]] || note "GPU_CHECK_PARTS: no part $asked (parts: $ALL_PARTS)"
done
MODELS=${GPU_CHECK_MODELS:-mlp}

# full PART MODEL CAP ARGS...: train_full.py for MODEL into OUT_DIR/PART less "train_".
full() {
  local name=$1 model=$2 cap=$3
  shift 3
  part "$name" "$cap" "$PY" benchmarks/train_full.py --data "$DATA" \
    --out "$OUT_DIR/${name#train_}" --set "model=$model" --device "$DEVICE" "$@"
}

# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
{
  if want train_full; then
    for model in $MODELS; do
      full "train_full_$model" "$model" 200 --save-gan "$OUT_DIR/full_$model/gan" \
        --time-limit 150 ${TRAIN_ARGS:-}
    done
  fi
  if want bench; then
    part bench 200 "$PY" benchmarks/train_throughput.py --devices "$DEVICE" --models mlp,dcgan \
      --data "$DATA" --out "$OUT_DIR/throughput.json" ${BENCH_ARGS:-}
  fi
  for model in $MODELS; do
    if want train_full_uncompiled; then
      full "train_full_${model}_uncompiled" "$model" 150 --set compile=false \
        --save-gan "$OUT_DIR/full_${model}_uncompiled/gan" --time-limit 100 ${TRAIN_ARGS:-}
    fi
    if want train_full_graph; then
      full "train_full_${model}_graph" "$model" 150 --set cuda_graph=true \
        --save-gan "$OUT_DIR/full_${model}_graph/gan" --time-limit 100 ${TRAIN_ARGS:-}
    fi
    if want train_full_eager; then
      full "train_full_${model}_eager" "$model" 90 --set compile=false --set cuda_graph=false \
        --set amp=false --epochs 5 --time-limit 60 ${TRAIN_ARGS:-}
    fi
  done
  if want repeat; then
    for run in 1 2; do
      full "repeat_$run" mlp 90 --epochs 3 ${TRAIN_ARGS:-}
    done
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
for path in sorted(out.glob("full_*/train_full.json")):
    full = json.loads(path.read_text())
    done, asked = full["epochs_done"], full["epochs_asked"]
    pace = full["median_epoch_seconds"] * 100
    print(f"train_full {path.parent.name}: {done}/{asked} epochs in {full['train_seconds']} s "
          f"({full['images_per_sec']:,.0f} img/s; first epoch {full['first_epoch_seconds']} s, "
          f"the others {full['later_epochs_seconds']} s; 100 epochs at the median pace: "
          f"{pace:.1f} s) on {full['device']}, {full['strategy']}, "
          f"weights {full['weights_sha256'][:12]}")
for r in (load("throughput.json") or {}).get("results", []):
    print(f"bench {r['device']} {r['model']}: baseline {r['baseline']['images_per_sec']:,.0f} "
          f"img/s, trainer {r['trainer']['images_per_sec']:,.0f} img/s "
          f"({r['trainer']['strategy']}), ratio {r['ratio']}; compiled/eager "
          f"{r.get('compiled_vs_eager', 'not measured')}")
repeats = [load(f"repeat_{run}/train_full.json") for run in (1, 2)]
if all(repeats):
    hashes = [r["weights_sha256"][:12] for r in repeats]
    print(f"repeat: {repeats[0]['epochs_done']} epochs twice ({repeats[0]['strategy']}), weights "
          f"{hashes[0]} and {hashes[1]}: bit-identical run to run: {hashes[0] == hashes[1]}")
profile = load("step_profile.json")
for r in (profile or {}).get("results", []):
    print(f"step_profile {r['model']} ({r['strategy']}): {r['ms_per_step']} ms/step, "
          f"{r['achieved_gflops']} GFLOP/s (fp32 GEMM {profile['ceiling']['fp32_gflops']}, bf16 "
          f"{profile['ceiling']['bf16_gflops']}); without the graph "
          f"{r.get('kernels_per_step')} kernels/step, {r.get('kernel_us_per_step')} us")
scoring = load("evaluate_device.json")
for r in (scoring or {}).get("results", []):
    diff = r.get("max_abs_diff_from_first")
    worst = max(diff.items(), key=lambda kv: kv[1]) if diff else None
    print(f"evaluate_device {r['device']}: reference {r['reference_seconds']} s, samples "
          f"{r['evaluate_seconds']} s; " + (f"largest difference from the CPU: {worst[0]} "
          f"{worst[1]:.2e}" if worst else "the base"))
fid = load("fid_check.json")
if fid:
    print(f"fid_check {fid['strategies']}: {fid['summary']}; verdict {fid['verdict']}")
EOF
note "done in $((SECONDS - START))s"
