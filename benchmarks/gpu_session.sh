#!/usr/bin/env bash
# The GPU session of issue 14, in one script: run it on the device machine from the repository
# root; everything it reports lands in $OUT (at most 6 files, no folders).
#
#   1. carried wheels .whl/*.whl (diffusers 0.42.1 + ftfy + wcwidth, peft 0.21.2) -> /tmp/site
#   2. random real-size test weights -> /tmp/test-weights-real (`faceid make-test-weights`); both
#      benchmarks load them through the real profile (load_real_components)
#   3. benchmarks/bench_infer_gpu.py, 81 frames 480x832, CFG 5: stock diffusers vs faceid vs fused
#      LoRA, SDPA backends, VAE decode with/without tiling          -> $OUT/infer_gpu.md
#   4. benchmarks/bench_train_gpu.py, 81 and 33 frames, with and without gradient checkpointing
#                                                                   -> $OUT/train_gpu.md
#   5. if time is left: torch.compile of the transformer blocks     -> $OUT/infer_gpu_compiled.md
# Also $OUT/session.log (everything printed) and $OUT/env.txt. Each step runs under `timeout`;
# a failed step is logged and the next one runs. Expected ~5 min on an H100/H200; at most ~10.
#
# Logic check on a CPU machine (tiny weights and geometry, same steps):
#   GPU_SESSION_CPU=1 PY=.venv/bin/python OUT=/tmp/gpu-out SITE=/tmp/site-check bash benchmarks/gpu_session.sh
set -uo pipefail

OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
BUDGET=${BUDGET:-420}            # seconds; step 5 starts only if 150 s of it are left
mkdir -p "$OUT"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

if [ "${GPU_SESSION_CPU:-0}" = 1 ]; then
  SIZE=tiny; WEIGHTS=/tmp/test-weights-tiny-check
  DEV=(--device cpu); GEOM=(--frames 9 --height 32 --width 32); TRAIN=(--frames 9 5 --height 32 --width 32)
  T_WEIGHTS=120; T_INFER=300; T_TRAIN=200
else
  SIZE=real; WEIGHTS=/tmp/test-weights-real
  DEV=(--device cuda); GEOM=(--frames 81 --height 480 --width 832); TRAIN=(--frames 81 33 --height 480 --width 832)
  T_WEIGHTS=150; T_INFER=300; T_TRAIN=150
fi

step() {  # step NAME TIMEOUT_S CMD...: run under timeout, log time and exit code, never abort the session
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, at ${SECONDS}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  return $rc
}

# 1. Wheels and environment
echo "=== wheels: $(ls .whl/*.whl 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("diffusers", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "huggingface_hub", "ftfy", "yaml", "pyarrow"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except Exception as exc:
        print(f"{name}: MISSING ({exc})")
EOF
} | tee "$OUT/env.txt"
"$PY" -c "import faceid.model.generate, faceid.train.recipe, faceid.model.memory" || { echo "faceid does not import"; exit 1; }

# 2. Real-size test weights (random, seed 0), written by the CLI users run
if [ ! -f "$WEIGHTS/model_index.json" ]; then
  step make-test-weights "$T_WEIGHTS" "$PY" -m faceid.cli make-test-weights --size "$SIZE" --output "$WEIGHTS" || exit 1
fi
du -sh "$WEIGHTS"

# 3. Inference: stock vs faceid (unfused, fused), SDPA backends, VAE tiling
step bench-infer "$T_INFER" "$PY" benchmarks/bench_infer_gpu.py --weights "$WEIGHTS" "${DEV[@]}" "${GEOM[@]}" \
  --timed-steps 3 --report-steps 30 50 --out "$OUT/infer_gpu.md"

# 4. Training: stage-2 step, 81 and 33 frames, with and without gradient checkpointing
step bench-train "$T_TRAIN" "$PY" benchmarks/bench_train_gpu.py --weights "$WEIGHTS" "${DEV[@]}" "${TRAIN[@]}" \
  --steps 3 --out "$OUT/train_gpu.md"

# 5. torch.compile of the blocks, only with enough time left (compile time is not in the figures)
LEFT=$((BUDGET - SECONDS))
if [ "$LEFT" -ge 150 ]; then
  step bench-infer-compiled "$LEFT" "$PY" benchmarks/bench_infer_gpu.py --weights "$WEIGHTS" "${DEV[@]}" "${GEOM[@]}" \
    --timed-steps 3 --compile --skip stock faceid sdpa vae --out "$OUT/infer_gpu_compiled.md"
else
  echo "=== bench-infer-compiled: skipped (${LEFT}s of the ${BUDGET}s budget left)"
fi

echo "=== session done in ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')"
sleep 1  # let tee flush session.log
