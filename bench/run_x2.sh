#!/usr/bin/env bash
# One call on a 2-GPU host: prodtune's configurations on GPU 0 (bench/run_device.sh) while Unsloth's
# run on GPU 1 (same model folder, data and timing; each configuration its own process and cold
# compile cache), then the Phi-3-medium-shaped (14B) random model for the FSDP run
# (bench/run_fsdp.sh) is saved to /tmp. Logs end up in $OUT/logs.tgz, the tables are printed last.
#   CONFIGS=small,small-t4 UNSLOTH=unsloth-packed,unsloth-packed-nockpt WARM_PAIR=1 TESTS=1 bash bench/run_x2.sh
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
mkdir -p "$OUT/unsloth"
model=$(model_dir llama) || exit 1
echo "wheels and model ready at $((SECONDS - start)) s"
( CUDA_VISIBLE_DEVICES=1 timeout "${UNSLOTH_BUDGET:-240}" python3 bench/bench_train.py --configs "${UNSLOTH:-unsloth-packed,unsloth-packed-nockpt}" \
    --model-dir "$model" --steps 5 --warmup 2 --timeout 120 --unsloth-site /tmp/site-unsloth \
    --out "$OUT/unsloth" > "$OUT/unsloth/bench.log" 2>&1
  echo "unsloth lane done at $((SECONDS - start)) s"
  medium=$(CUDA_VISIBLE_DEVICES=1 model_dir phi3-medium 2> "$OUT/unsloth/medium.log")
  echo "14B model saved at $((SECONDS - start)) s: $(du -sh "$medium" | cut -f1)" ) &
lane=$!
CUDA_VISIBLE_DEVICES=0 WHEELS=$WHEELS BUDGET=$(( ${BUDGET:-480} - (SECONDS - start) )) bash bench/run_device.sh
wait $lane
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log */*.log */log-* log-* 2>/dev/null) && \
  (cd "$OUT" && rm -f *.log */*.log */log-* log-*)
python3 - "$OUT" <<'PY'
import json, sys, glob
sys.path[:0] = ["bench"]
from bench_train import table
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/**/train-*.json", recursive=True)):
    rows += json.load(open(f))["results"]
print(table(rows))
PY
