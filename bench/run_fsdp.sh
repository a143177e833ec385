#!/usr/bin/env bash
# FSDP-QLoRA on one 2-GPU host: configs/accelerate/fsdp-qlora.yaml launching bench_train.py's `small`
# configuration (what `prodtune train` runs under FSDP) on a Phi-3-medium-shaped (14B) random model:
# tokens/s over both GPUs and peak memory of each. The model is saved once to /tmp (bench/run_x2.sh
# saves it on a warm machine).
#   bash bench/run_fsdp.sh            # writes $OUT/scaling-h200-x2.json and the log
set -uo pipefail
start=$SECONDS
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[[ -d /tmp/site/trl ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
model=/tmp/model-phi3-medium
[[ -f $model/config.json ]] || python3 -c "import sys; sys.path[:0] = ['bench', 'tests']; from pathlib import Path; from bench_train import make_model_dir; make_model_dir(Path('$model'), False, 'phi3-medium')"
echo "model ready at $((SECONDS - start)) s ($(du -sh $model | cut -f1))"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
timeout $(( ${BUDGET:-540} - (SECONDS - start) )) python3 bench/bench_train.py --gpus 2 --configs small --shape phi3-medium \
  --model-dir "$model" --accelerate-config configs/accelerate/fsdp-qlora.yaml --warmup "${WARMUP:-2}" \
  --steps "${STEPS:-4}" --timeout 480 --out "$OUT" 2>&1 | tee "$OUT/fsdp.log" | grep -v "^\[rank" | tail -30
grep -E "Error|error:" "$OUT/log-scaling.txt" | head -20
