#!/usr/bin/env bash
# Issue 7, round 2, on one host of 4 GPUs (nvidia-h100-x4 / nvidia-h200-x4): prodtune's default GPU
# path (fast, Phi-3-mini shape, 4-bit base) under `accelerate launch` on 1, 4 and 2 GPUs at one
# global batch of STEP_TOKENS tokens per optimizer step (train.step_tokens; 65536 lets each of 4
# GPUs keep the one-GPU 16k micro-batch, and 1 GPU accumulates 4 of them), then (TESTS=1) the
# GPU-marked tests of training on GPU 0, after the timed runs so that compiling does not compete.
# Writes under $OUT: scaling-<card>-x<N>[-step<K>k].json, log-scaling.txt, gpu-tests.log.
# Usage on the device, from the repo root, after the wheels line of ../shared/tools/device-wheels.sh:
#   STEP_TOKENS=65536 GPUS=1,4,2 BUDGET=420 TESTS=1 bash bench/run_scaling.sh
# On a CPU (gloo processes, tiny model): BENCH_ARGS=--tiny GPUS=1,2 STEP_TOKENS=32768 bash bench/run_scaling.sh
set -uo pipefail
start=$SECONDS
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TORCH_LOGS=recompiles
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
python3 -c 'import torch, transformers, trl, peft, accelerate, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "bnb", b.__version__, "gpus", torch.cuda.device_count())'
model_args=()
if [[ " ${BENCH_ARGS:-} " != *" --tiny "* ]]; then
  # The random Phi-3-mini-shaped model, saved once (kept on a warm machine) for every launch.
  [[ -f /tmp/phi3/config.json ]] || python3 -c "import sys; sys.path[:0] = ['bench', 'tests']; from pathlib import Path; from bench_train import make_model_dir; make_model_dir(Path('/tmp/phi3'), False, 'phi3')"
  model_args=(--model-dir /tmp/phi3)
  echo "model ready at $((SECONDS - start)) s"
fi
budget=$(( ${BUDGET:-420} - (SECONDS - start) ))
timeout $((budget + 20)) python3 bench/bench_train.py --gpus "${GPUS:-1,4,2}" --step-tokens "${STEP_TOKENS:-65536}" \
  --warmup "${WARMUP:-3}" --steps "${STEPS:-5}" --timeout 300 --budget "$budget" --out "$OUT" \
  --shape phi3 "${model_args[@]}" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/run_scaling.log"
if [[ -n "${TESTS:-}" ]]; then
  echo "===== GPU tests ($((SECONDS - start)) s)"
  CUDA_VISIBLE_DEVICES=0 timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_train.py tests/test_fast.py > "$OUT/gpu-tests.log" 2>&1
  tail -15 "$OUT/gpu-tests.log"
fi
echo "===== summary ($((SECONDS - start)) s)"
python3 bench/bench_train.py --summarize "$OUT"
