#!/usr/bin/env bash
# One 4-GPU accelerator session for issues 3, 4 and 7 (the lead's device call):
#   GPU 2: the GPU-marked tests (pytest -m gpu)          -> $OUT/gpu-tests.log
#   GPU 3: bench_generate.py (batched vs one at a time)  -> $OUT/generate-<card>.json, generate.log
#   GPU 0: the one-GPU scaling baseline (fast path)       at the same time, then
#   GPUs 0-3: the 4- and 2-GPU data-parallel runs        -> $OUT/scaling-*.json, run_multi.log
# Usage on the device after the wheels line: bash bench/run_gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
CUDA_VISIBLE_DEVICES=2 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu-tests.log" 2>&1 &
t=$!
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oE 'H100|H200' | tr 'A-Z' 'a-z')
CUDA_VISIBLE_DEVICES=3 timeout 240 python3 bench/bench_generate.py --batch-size 256 --baseline-n 16 \
  --out "$OUT/generate-${card:-gpu}.json" > "$OUT/generate.log" 2>&1 &
g=$!
# The random Phi-3-mini-shaped model, saved once for every launch below.
python3 -c "import sys; sys.path[:0] = ['bench', 'tests']; from pathlib import Path; from bench_train import make_model_dir; make_model_dir(Path('/tmp/phi3'), False, 'phi3')"
# One GPU first (GPU 0) while the two jobs above use GPUs 2 and 3; then 4 and 2 GPUs once they end.
python3 bench/bench_train.py --gpus 1 --shape phi3 --model-dir /tmp/phi3 --warmup 3 --steps 5 --timeout 180 --out "$OUT" 2>&1 | tee "$OUT/log-scaling.txt"
wait $t $g
python3 bench/bench_train.py --gpus 4,2 --shape phi3 --model-dir /tmp/phi3 --warmup 3 --steps 5 --timeout 180 --budget 330 --out "$OUT" 2>&1 | tee -a "$OUT/log-scaling.txt"
echo "===== gpu tests"; tail -15 "$OUT/gpu-tests.log"
echo "===== generate"; tail -25 "$OUT/generate.log"
echo "===== scaling"; python3 bench/bench_train.py --summarize "$OUT"
