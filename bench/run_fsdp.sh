#!/usr/bin/env bash
# FSDP-QLoRA on one 2-GPU host: configs/accelerate/fsdp-qlora.yaml launching bench_train.py's `small`
# configuration (what `prodtune train` runs under FSDP) on a Phi-3-medium-shaped (14B) random model:
# tokens/s over both GPUs and peak memory of each. The model is saved once to /tmp (bench/run_x2.sh
# saves it on a warm machine).
#   bash bench/run_fsdp.sh            # writes $OUT/scaling-h200-x2.json and the log
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
model=$(model_dir phi3-medium) || exit 1
echo "model ready at $((SECONDS - start)) s ($(du -sh $model | cut -f1))"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
timeout $(( ${BUDGET:-540} - (SECONDS - start) )) python3 bench/bench_train.py --gpus 2 --configs small --shape phi3-medium \
  --model-dir "$model" --accelerate-config configs/accelerate/fsdp-qlora.yaml --warmup "${WARMUP:-2}" \
  --steps "${STEPS:-4}" --timeout 480 --out "$OUT" 2>&1 | tee "$OUT/fsdp.log" | grep -v "^\[rank" | tail -30
grep -E "Error|error:" "$OUT/log-scaling.txt" | head -20
