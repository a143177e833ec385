#!/usr/bin/env bash
# One accelerator-machine call: the wheels, the random model (kept in /tmp between calls on a warm
# machine), bench_train.py's configurations (each in its own process, cold compile cache), then the
# GPU-marked tests if time is left. Everything lands under $OUT; the table is printed last.
# WARM_PAIR=1 first runs `fast` twice on one compile cache (cold, then warm).
# Usage on the device, from this checkout's root (.whl/ and .whl-unsloth/ from
# ../shared/tools/device-wheels.sh, carried beside it):
#   CONFIGS=fast,small,unsloth-packed BUDGET=540 TESTS=1 [TESTS_K=sync] bash bench/run_device.sh
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
python3 -c 'import torch, transformers, trl, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__)'
shape=${SHAPE:-llama}
model=$(model_dir "$shape") || exit 1
echo "model ready at $((SECONDS - start)) s"
tests_s=$([[ -n "${TESTS:-}" ]] && echo "${TESTS_TIMEOUT:-120}" || echo 0)
if [[ -n "${WARM_PAIR:-}" ]]; then
  # Two `fast` processes sharing prodtune's compile cache (~/.cache/prodtune/compile), empty at first:
  # the first compiles (a cold start), the second loads what the first compiled.
  rm -rf ~/.cache/prodtune/compile
  timeout 200 python3 bench/bench_train.py --configs fast,fast --warm-cache --shape "$shape" --model-dir "$model" \
    --steps "${STEPS:-5}" --warmup "${WARMUP:-2}" --timeout 100 --out "$OUT/warm" > "$OUT/bench-warm.log" 2>&1
  echo "warm pair rc $? at $((SECONDS - start)) s"; tail -4 "$OUT/bench-warm.log"
fi
left=$(( ${BUDGET:-540} - (SECONDS - start) - tests_s ))
timeout "$left" python3 bench/bench_train.py --configs "${CONFIGS:-fast,small,reference,plain}" --shape "$shape" \
  --model-dir "$model" --steps "${STEPS:-5}" --warmup "${WARMUP:-2}" --timeout "${CONFIG_TIMEOUT:-150}" \
  --unsloth-site /tmp/site-unsloth --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc $? at $((SECONDS - start)) s"
if [[ -n "${TESTS:-}" ]]; then
  timeout "$tests_s" python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} tests/test_fast.py tests/test_train.py \
    > "$OUT/gpu-tests.log" 2>&1
  tail -4 "$OUT/gpu-tests.log"
fi
grep -E "^\{" "$OUT/bench.log" | cut -c1-300 | tail -20
tail -22 "$OUT/bench.log"
