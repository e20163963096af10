#!/usr/bin/env bash
# One prepared GPU benchmark whose output can be pasted as is (issue 18): <= 8 minutes on one CUDA GPU.
#
#   bash bench/gpu.sh                      # CUDA if available, else a CPU dry run (--device cpu --quick)
#   bash bench/gpu.sh --device cpu --quick # the dry run: tiny shapes, every section, 1-3 minutes on 2 CPUs
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Sections (each prints a table):
#   1. DINOv3 ViT-L/16 (transformers dinov3_vit, random init: no download), bf16 autocast, at 224 px and
#      at 1024 px: bare forward on ready tensors vs the embed stage's full pipeline (bench/embed.py).
#   2. SAE training on the device: bench/sae.py (single TopK config, + AuxK, 8 configs one pass vs
#      sequential), then the study's Matryoshka BatchTopK config (preset: study, levels 128..8192,
#      level_k 5/10/20/40, d = 1024, batch 2048) through medsae's trainer.
#   3. The Ray executor on this machine: the demo spec (experiments/demo.yaml) run with --executor ray
#      and with the local executor, each in a fresh temp project folder (only if `import ray` works).
# --quick shrinks every section (tiny ViT and phantom, tiny SAE shapes, a tiny Matryoshka, the demo
# shrunk to its slices and embed stages, Ray only); CI runs it (tests/test_bench_gpu.py). Without
# --quick the shapes are the GPU's: ViT-L/16 at 1024 px on a CPU would take hours.
set -euo pipefail

DEVICE=auto
QUICK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (use --device DEV, --quick)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" LITELLM_LOCAL_MODEL_COST_MAP="${LITELLM_LOCAL_MODEL_COST_MAP:-True}"
export MEDSAE_QUIET=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/medsae-gpu-bench.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
cd "$ROOT"
START=$SECONDS

# ---------------------------------------------------------------------------------------------- header
# one python start (torch's import costs seconds): resolve the device and print the header
DEVICE_FILE="$OUT/device"
"$PY" - "$DEVICE" "$QUICK" "$DEVICE_FILE" <<'EOF'
import os, platform, subprocess, sys, time
import torch
device, quick, device_file = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
cuda = torch.cuda.is_available()
if device == "auto" and not cuda:
    print("NO CUDA GPU on this machine: running the CPU dry run (--device cpu --quick), not the GPU benchmark")
    device, quick = "cpu", True
elif device == "auto":
    device = "cuda"
if device.startswith("cuda") and not cuda:
    sys.exit(f"bench/gpu.sh: --device {device} asked for but torch {torch.__version__} sees no CUDA GPU")
with open(device_file, "w") as fh:
    fh.write(f"{device} {int(quick)}\n")
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = "?"
print(f"# medsae bench/gpu.sh  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  commit {commit or '?'}")
print(f"# device {device}{'  (quick: tiny shapes, a dry run, not a measurement)' if quick else ''}")
print(f"# torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, python {platform.python_version()}, "
      f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.1f}")
if cuda:
    # bf16 as training resolves it (preset: study picks bf16-mixed only where bf16 is native, not emulated)
    from medsae.sae.precision import bf16_support
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = bf16_support(torch.device("cuda", i))[0]
        print(f"# GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
              f"bf16 {'yes' if bf16 else 'no (emulated only: preset study trains in fp32)'}")
else:
    print("# GPU: none")
EOF
read -r DEVICE QUICK < "$DEVICE_FILE"

section() { printf '\n## %s   [t = %ds]\n' "$1" "$((SECONDS - START))"; }

# ------------------------------------------------------------------------------ 1. DINOv3 ViT-L/16 embed
VITL='{"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
       "num_register_tokens": 4, "layerscale_value": 1e-5, "patch_size": 16}'
if [[ "$QUICK" == 1 ]]; then
  VIT='{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "num_register_tokens": 4, "patch_size": 16}'
  EMBED_QUICK=(--subjects 2 --shape 24 24 28 --input-size 32 64 --batch-size 16 --rounds 1 --workers 0 auto)
  LABEL="tiny dinov3_vit (2 layers, d=32; stands in for ViT-L/16)"
  PRECISION=fp32
else
  VIT="$VITL"
  EMBED_224=(--subjects 24 --shape 64 64 512 --input-size 224 --batch-size 128 --rounds 2 --workers auto)
  EMBED_1024=(--subjects 8 --shape 64 64 256 --input-size 1024 --batch-size 32 --rounds 2 --workers auto)
  LABEL="DINOv3 ViT-L/16 (transformers dinov3_vit, random init)"
  PRECISION=bf16
  if [[ "$DEVICE" == cpu ]]; then PRECISION=fp32; fi
fi
EMBED=(--source transformers --model dinov3_vit --model-kwargs "$VIT" --precision "$PRECISION"
       --device "$DEVICE" --shard-size 4096)

if [[ "$QUICK" == 1 ]]; then
  section "1. $LABEL, $PRECISION: bare forward vs full pipeline (quick: 32 and 64 px stand in for 224 and 1024)"
  "$PY" bench/embed.py "${EMBED[@]}" "${EMBED_QUICK[@]}" 2>&1
else
  section "1a. $LABEL, 224 px, $PRECISION: bare forward vs full pipeline"
  "$PY" bench/embed.py "${EMBED[@]}" "${EMBED_224[@]}" 2>&1
  section "1b. $LABEL, 1024 px, $PRECISION: bare forward vs full pipeline"
  "$PY" bench/embed.py "${EMBED[@]}" "${EMBED_1024[@]}" 2>&1
fi

# ------------------------------------------------------------------------------------------ 2. SAE bench
section "2a. SAE trainer on $DEVICE: single TopK config, 8 configs one pass vs sequential (bench/sae.py)"
SAE_ARGS=(--device "$DEVICE")
# quick: smaller still than bench/sae.py --quick (whose shapes it fixes), so the dry run takes seconds
if [[ "$QUICK" == 1 ]]; then SAE_ARGS+=(--d 64 --latents 512 --k 8 --batch 256 --steps 2); fi
"$PY" bench/sae.py "${SAE_ARGS[@]}" 2>&1

section "2b. SAE trainer on $DEVICE: the study's Matryoshka BatchTopK config (preset: study)"
"$PY" - "$DEVICE" "$QUICK" <<'EOF'
import sys, time
import numpy as np
import torch
from medsae.sae.config import SAESpec
from medsae.sae.data import ArrayStore, TrainData
from medsae.sae.train import TrainJob, compute_dtype, resolve_device, train_many

device, quick = resolve_device(sys.argv[1]), sys.argv[2] == "1"
if quick:
    d, levels, level_k, batch, steps = 64, [16, 64, 256], [2, 4, 8], 256, 6
else:  # the study grid's DINOv3 ViT-L CLS configuration (docs/method.md#study-grid)
    d, levels, level_k, batch, steps = 1024, [128, 512, 2048, 8192], [5, 10, 20, 40], 2048, 120 if device.type == "cuda" else 8
spec = SAESpec(preset="study", levels=levels, level_k=level_k, batch_size=batch, epochs=1, log_every=10**6)
x = (np.random.default_rng(0).normal(size=(batch * (steps + 1), d)) + 0.5).astype(np.float32)
data = TrainData(ArrayStore(x), np.arange(len(x)), device, 1e12)
ends = []

def on_step(step):
    if device.type == "cuda":
        torch.cuda.synchronize()
    ends.append(time.perf_counter())

t0 = time.perf_counter()
result = train_many([TrainJob(spec.model_dump(mode="json"))], data, device, on_step=on_step)[0]
wall = time.perf_counter() - t0
gaps = np.diff(ends)[2:] if len(ends) > 4 else np.diff([t0, *ends])  # the first steps warm up
rate = batch / float(np.median(gaps))
last = result.log[-1] if result.log else {}
matmul = str(compute_dtype(spec.precision, device)).replace("torch.", "")
print(f"matryoshka/batchtopk, levels {levels}, level_k {level_k}, d={d}, batch {batch}, precision {spec.precision} "
      f"({matmul} encoder matmul on {device}), torch threads {torch.get_num_threads()}")
print(f"| {'measure':<34} | {'steps':>5} | {'samples/s':>10} | {'wall s':>7} |")
print(f"|{'-' * 36}|{'-' * 7}|{'-' * 12}|{'-' * 9}|")
print(f"| {'medsae trainer, study Matryoshka':<34} | {len(ends):>5} | {rate:>10,.0f} | {wall:>7.2f} |")
if "dead_fraction" in last:
    print(f"(dead fraction at the end: {100 * last['dead_fraction']:.0f} %)")
EOF

# ------------------------------------------------------------------------------------------ 3. Ray executor
section "3. Ray executor on this machine: the demo spec, --executor ray (and local, for comparison, unless quick)"
if ! "$PY" -c "import ray" >/dev/null 2>&1; then
  echo "ray is not installed for $PY: section skipped (pip install 'medsae[ray]')"
else
  DEMO_SETS=()
  ONLY=()
  EXECUTORS=(ray local)
  if [[ "$QUICK" == 1 ]]; then
    EXECUTORS=(ray)
    # the demo made small (as tests/test_executor_ray.py does), and only its slices + embed stages
    DEMO_SETS=(--set 'data.phantom={"subjects": 2, "seed": 0, "shape": [24, 24, 32]}' --set data.size=32
               --set embed.input_size=32 --set embed.pretrained=false --set embed.batch_size=16
               --set embed.shard_size=64)
    ONLY=(--only slices --only embed)
  fi
  declare -A WALL
  for executor in "${EXECUTORS[@]}"; do
    project="$OUT/demo_$executor"
    mkdir -p "$project"
    cp experiments/demo.yaml "$project/demo.yaml"
    echo "--- medsae exp run demo.yaml --executor $executor ${ONLY[*]}"
    t0=$(date +%s.%N)
    (cd "$project" && "$PY" -m medsae.cli.main exp run demo.yaml --executor "$executor" "${DEMO_SETS[@]}" \
       "${ONLY[@]}" --registry "$project/registry.duckdb" -q 2>&1)
    WALL[$executor]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  done
  echo
  echo "| executor | wall s (incl. start-up) |"
  echo "|----------|-------------------------|"
  for executor in "${EXECUTORS[@]}"; do printf '| %-8s | %23s |\n' "$executor" "${WALL[$executor]}"; done
fi

section "done"
