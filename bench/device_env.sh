# Sourced by the accelerator-machine scripts (run_device.sh, run_x2.sh, run_fsdp.sh), from the
# repository root: the environment, the wheels installed once per machine, and `model_dir SHAPE`, the
# random model of a shape saved once to /tmp (both kept between calls on a warm machine).
start=${start:-$SECONDS}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
# NVLink multicast off (the device tool's KINDS.md); nothing changes on one GPU.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# install_site DIR WHEELS PACKAGE: the wheels of folder WHEELS into DIR, unless DIR/PACKAGE is there.
install_site() {
  [[ -d "$1/$3" ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$1" "$2"/*.whl
}

# model_dir SHAPE: prints /tmp/model-SHAPE after saving the random model of bench_train.SHAPES[SHAPE]
# there unless it is already saved (its output goes to stderr).
model_dir() {
  local dir=/tmp/model-$1
  [[ -f $dir/config.json ]] || python3 -c "import sys; sys.path[:0] = ['bench', 'tests']; from pathlib import Path; from bench_train import make_model_dir; make_model_dir(Path('$dir'), False, '$1')" >&2 || return 1
  echo "$dir"
}

install_site /tmp/site "$WHEELS" trl || exit 1
if [[ -d "$WHEELS-unsloth" ]]; then
  install_site /tmp/site-unsloth "$WHEELS-unsloth" unsloth || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src
