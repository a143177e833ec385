#!/usr/bin/env bash
# Issue 7 on one host of 4 GPUs (nvidia-h100-x4 / nvidia-h200-x4): prodtune's default GPU path
# (fast, Phi-3-mini shape, 4-bit base) data-parallel under `accelerate launch` on 1, 2 and 4 GPUs
# with the global batch kept (16k tokens per optimizer step), then, time permitting, on 4 and 2
# GPUs that each keep the one-GPU micro-batch (weak scaling: shows what the smaller per-GPU
# micro-batches cost). Prints one table at the end; ends within ~6.5 minutes (launches that would
# overrun are skipped). Writes under $OUT (7 files at most):
#   scaling-<card>-x{1,2,4}.json  scaling-<card>-x{4,2}-pergpu.json  log-scaling.txt  run_multi.log
# Usage on the device, from the repo root, after the wheels line that ../shared/tools/device-wheels.sh
# prints (it puts trl, datasets and bitsandbytes on PYTHONPATH):
#   bash bench/run_multi.sh [GPU_LIST] [WARMUP] [STEPS]         # defaults: 1,4,2,4p,2p 3 5
# (4 before 2: if a launch must be skipped for time, it is the 2-GPU one; the table sorts them.)
# On a CPU, the same code path with 2 gloo processes: BENCH_ARGS=--tiny bash bench/run_multi.sh 1,2,2p 1 2
set -uo pipefail
start=$SECONDS
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# NVLink multicast stays off on these hosts (KINDS.md); exported, so every process accelerate starts has it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TORCH_LOGS=recompiles
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
{
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -6
  python3 -c 'import torch, transformers, trl, peft, accelerate, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "bnb", b.__version__, "gpus", torch.cuda.device_count())'
  # Everything below must end by ~390 s after the start: the bench skips launches that would overrun.
  budget=$((385 - (SECONDS - start)))
  timeout $((budget + 15)) python3 bench/bench_train.py --gpus "${1:-1,4,2,4p,2p}" --warmup "${2:-3}" \
    --steps "${3:-5}" --timeout 180 --budget "$budget" --shape phi3 --out "$OUT" ${BENCH_ARGS:-}
  echo
  echo "===== summary ($((SECONDS - start)) s)"
  python3 bench/bench_train.py --summarize "$OUT"
} 2>&1 | tee "$OUT/run_multi.log"
