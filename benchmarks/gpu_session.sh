#!/usr/bin/env bash
# The GPU session of issue 22 (item 4), one command per device call: run it on the device machine from
# the repository root; what it reports lands in $OUT (at most 5 files, no folders).
#
#   1. carried wheels .whl/*.whl, if any (e.g. diffusers 0.42.1 + ftfy + wcwidth, peft 0.21.2) -> $SITE
#   2. random real-size test weights with the FULL-SIZE text encoder (UMT5-XXL, 11.4 GB bf16) ->
#      /tmp/test-weights-real-xxl (`faceid make-test-weights --size real --text-encoder umt5-xxl`, ~3 min;
#      kept while the machine stays warm)
#   3. benchmarks/bench_infer_gpu.py: whole 50-step 480x832x81 CFG videos, stock diffusers vs faceid
#      (shipped real profile) vs faceid compiled, 3 rounds in rotating order, then the prompt-encode
#      cost and memory; no run starts that would end after the call's budget   -> $OUT/infer_gpu_e2e.md
#   4. the runs so far                                                           -> $OUT/infer_runs.jsonl
# Also $OUT/session.log (everything printed) and $OUT/env.txt.
#
# Device time: 9 videos of ~100 s (H100, uncompiled) plus, per call, ~2-4 min of loading, warm-up
# and torch.compile, plus ~3 min for the weights once: ~20-25 min in all, more than one 10-minute call.
# Run the SAME command again (warm machine: weights and runs kept in /tmp) until the log says
# "0 to do"; a fresh machine starts over unless the runs come with it: copy the last
# $OUT/infer_runs.jsonl into a carried folder and set RUNS to it. The results file then says how many
# runs it holds ("Incomplete: ..." until all 9).
#
#   OUT=$OUT BUDGET=560 bash benchmarks/gpu_session.sh          # REPEATS=2: 6 runs instead of 9
#
# Estimated on an H100 (not yet run): weights ~2-3 min, loading three pipelines + warm-ups + compile
# ~3-4 min, then ~95-115 s a run: the first 10-minute call gets about one round (3 runs), a second call
# on the warm machine about four more. A 15-minute session therefore gets 1-2 rounds, not 3.
#
# Logic check on a CPU machine (tiny weights and geometry, same steps):
#   GPU_SESSION_CPU=1 PY=.venv/bin/python OUT=/tmp/gpu-out SITE=/tmp/site-check bash benchmarks/gpu_session.sh
set -uo pipefail

OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
BUDGET=${BUDGET:-560}            # seconds this call may use (device calls stop at 600)
mkdir -p "$OUT"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

if [ "${GPU_SESSION_CPU:-0}" = 1 ]; then
  SIZE=(--size tiny); WEIGHTS=/tmp/test-weights-tiny-check; RUNS=${RUNS:-/tmp/bench-infer-runs-cpu.jsonl}
  DEV=(--device cpu); GEOM=(--frames 5 --height 32 --width 32 --steps 2 --repeats 2)
else
  SIZE=(--size real --text-encoder umt5-xxl); WEIGHTS=/tmp/test-weights-real-xxl; RUNS=${RUNS:-/tmp/bench-infer-runs.jsonl}
  DEV=(--device cuda); GEOM=(--frames 81 --height 480 --width 832 --steps 50 --repeats "${REPEATS:-3}")
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

# 1. Wheels (if carried) and environment
if ls .whl/*.whl >/dev/null 2>&1; then
  echo "=== wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("diffusers", "transformers", "peft", "accelerate", "triton", "safetensors", "ftfy", "yaml", "pyarrow"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except Exception as exc:
        print(f"{name}: MISSING ({exc})")
EOF
} | tee "$OUT/env.txt"
"$PY" -c "import faceid.model.generate, faceid.render, faceid.model.compiled" || { echo "faceid does not import"; exit 1; }

# 2. Test weights with the full-size text encoder (random, seed 0), written by the CLI users run
if [ ! -f "$WEIGHTS/model_index.json" ]; then
  step make-test-weights 300 "$PY" -m faceid.cli make-test-weights "${SIZE[@]}" --output "$WEIGHTS" || exit 1
fi
du -sh "$WEIGHTS"

# 3. Whole videos, rotating order, as many runs as fit in what is left of the budget (60 s kept for the report)
LEFT=$((BUDGET - SECONDS - 60))
cp "$RUNS" "$OUT/infer_runs.jsonl" 2>/dev/null
step bench-infer $((LEFT + 50)) "$PY" benchmarks/bench_infer_gpu.py --weights "$WEIGHTS" "${DEV[@]}" "${GEOM[@]}" \
  --budget-s "$LEFT" --runs "$RUNS" --out "$OUT/infer_gpu_e2e.md"

# 4. The runs so far (carry them into the next call if the machine is fresh)
cp "$RUNS" "$OUT/infer_runs.jsonl" 2>/dev/null
echo "=== session done in ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')"
sleep 1  # let tee flush session.log
