"""GPU training speed (issue 6): the 'fast' and 'small' paths on top of TRL's SFTTrainer.

The plain QLoRA recipe (batch 2 x 4, padded, every weight dequantized from 4 bits three times per
micro-batch, fp32 residual stream) keeps an H100 about 2% busy. What these paths change, and why:

* Padding-free packing (TRL's best-fit-decreasing packing): whole examples are packed into rows of
  `max_length` tokens and a micro-batch is `rows` such rows flattened into one sequence, so no
  padding is computed. Position ids restart at 0 for every example; labels stay -100 on prompt
  tokens and on each example's first token (TRL's padding-free collator does both). The row is
  padded to exactly rows * max_length so that every batch has one shape (compiled code is reused).
* No attention across examples: FlexAttention with the document mask transformers builds from the
  restarting position ids. It skips the masked blocks, where SDPA with a dense mask would compute
  every (query, key) pair of the flattened row.
* Big token batches: ~16k tokens per micro-batch, so each weight matrix is used on many rows.
* Dequantize once (fast path): the base is frozen, so its NF4 weights dequantize to the same bf16
  values on every call. We dequantize each once, keep the bf16 copy (7.6 GB for Phi-3-mini) and
  run plain bf16 matmuls: the same numbers bitsandbytes would compute, without 3 dequantizations
  per weight per micro-batch, and code that torch.compile can fuse.
* bf16 residual stream: peft's prepare_model_for_kbit_training casts the frozen norms, embeddings
  and LM head to fp32, which makes every activation fp32. They are frozen, so we cast them back.
* torch.compile of each decoder layer (fast path): fuses RMSNorm, RoPE, SiLU*up and the LoRA
  scale-and-add into few kernels.
* Checkpointing chosen from memory: recomputing the forward costs 2N of the 6N FLOPs per token,
  so 80 GB cards checkpoint every other layer (5N), smaller ones every layer.

Measured on an H200 (bench/NOTES.md): the plain recipe 663-729 tokens/s; fast 22.9k (every
other layer checkpointed, 37.6 GiB peak) or 19.7k (every layer, 15 GiB); small 11.7k in 5.4 GiB.
* Cross-entropy: TRL >= 1.16 already projects through the LM head in chunks and only at labelled
  positions (its fused LM head), so the full fp32 logits are never built.

Use from train.py (see `plan`):

    speed = fast.plan(cfg.train, cfg.model, device)
    args = SFTConfig(..., **fast.sft_overrides(speed, cfg.train))
    trainer = SFTTrainer(...)
    fast.prepare(trainer.model, speed)
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace
from typing import Any, Literal

from prodtune.config import ModelConfig, TrainConfig
from prodtune.errors import UserError

SpeedPath = Literal["plain", "fast", "small"]

FAST_MIN_GIB = 40.0
"""Cards with at least this much memory take the fast path; smaller ones the small path."""
FAST_TOKENS = 16384
"""Tokens per micro-batch on the fast path (8 rows of 2048)."""
SMALL_TOKENS = 8192
"""Tokens per micro-batch on the small path (4 rows of 2048): 5.4 GiB peak measured for Phi-3-mini."""
HALF_CHECKPOINT_MIN_GIB = 70.0
"""Fast-path cards with at least this much memory (H100/H200/A100 80 GB) checkpoint every other
layer (5N FLOPs/token, 37.6 GiB peak measured); smaller ones every layer (6N, 15 GiB)."""

# Keyword arguments TRL's padding-free collator adds for flash-attention's varlen kernels. Flex
# attention gets the same information from the position ids; dropping them before the compiled
# layers keeps their changing shapes and values from recompiling the layer on every batch.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(frozen=True)
class SpeedPlan:
    """How this run trains on this machine; settled once by `plan`."""

    path: SpeedPath
    """plain = TRL as configured; fast = packed, flex attention, bf16 base copy, compiled; small = packed, 4-bit live."""
    reason: str
    """Why this path (printed and put in the training report)."""
    rows: int = 0
    """Packed rows of max_length tokens per micro-batch (0 on the plain path)."""
    max_length: int = 2048
    """Tokens per packed row (train.max_length)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    checkpoint_every: int = 1
    """Gradient checkpointing: 0 = off, k = every k-th decoder layer (1 = all)."""
    compile: bool = False
    """torch.compile each decoder layer."""
    dequantize_once: bool = False
    """Replace on-the-fly 4-bit dequantization by a bf16 copy of the frozen base."""
    attn_implementation: str | None = None
    """Attention kernel to switch the model to (None = leave it)."""
    bf16_frozen: bool = False
    """Cast frozen fp32 norms/embeddings/LM head back to bf16 (bf16 residual stream)."""

    @property
    def tokens_per_microbatch(self) -> int:
        return self.rows * self.max_length

    @property
    def flops_factor(self) -> float:
        """Model FLOPs per token over N: 2N forward + 2N backward (frozen base: no weight gradients),
        plus 2N for the recomputed forward of each checkpointed layer."""
        share = 1.0 / self.checkpoint_every if self.checkpoint_every else 0.0
        return 4.0 + 2.0 * share

    def describe(self) -> str:
        if self.path == "plain":
            return f"plain ({self.reason})"
        ckpt = {0: "no checkpointing", 1: "checkpointing every layer"}.get(
            self.checkpoint_every, f"checkpointing every {self.checkpoint_every}th layer")
        parts = [f"{self.rows}x{self.max_length} packed tokens x {self.grad_accum} accumulation", ckpt,
                 self.attn_implementation or "default attention"]
        if self.dequantize_once:
            parts.append("bf16 copy of the 4-bit base")
        if self.compile:
            parts.append("compiled layers")
        return f"{self.path} ({self.reason}): " + ", ".join(parts)


def card_memory_gib(device: Any = "cuda") -> float:
    """Total memory of the CUDA card in GiB (0 when there is none)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def plan(train_cfg: TrainConfig, model_cfg: ModelConfig, device: Any,
         memory_gib: float | None = None) -> SpeedPlan:
    """Choose the training path from train.speed and the card: fast on cards of >= 40 GiB,
    small below (it trains Phi-3-mini in <= 14 GiB), plain on a CPU or when asked.

    `memory_gib` overrides the card's memory (tests, planning for another card).
    """
    import torch

    speed = train_cfg.speed
    device = torch.device(device)
    if device.type != "cuda":
        if speed in ("fast", "small"):
            raise UserError(f"train.speed={speed} needs a CUDA GPU; this run is on {device.type}: "
                            "use train.speed=auto (or plain)")
        return SpeedPlan("plain", f"{device.type}: the speed paths are for CUDA GPUs")
    if speed == "plain":
        return SpeedPlan("plain", "train.speed=plain")
    if train_cfg.packing is False:
        if speed == "auto":
            return SpeedPlan("plain", "train.packing=false")
        raise UserError(f"train.speed={speed} packs examples; it cannot run with train.packing=false "
                        "(set train.packing=auto, or train.speed=plain)")
    gib = card_memory_gib(device) if memory_gib is None else memory_gib
    if speed == "auto":
        speed = "fast" if gib >= FAST_MIN_GIB else "small"
        reason = f"auto: {gib:.0f} GiB card"
    else:
        reason = f"train.speed={speed}"
    max_length = train_cfg.max_length
    major, _ = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (9, 0)
    # FlexAttention's Triton kernels need Ampere or newer; on a T4 (sm75) fall back to SDPA with
    # transformers' dense document mask, which costs (row length)^2, so keep one row per batch there.
    flex = major >= 8 and _has_flex()
    # fp16 cards (T4) keep peft's fp32 norms/embeddings: an fp16 residual stream could overflow.
    bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    if speed == "fast":
        rows = max(1, FAST_TOKENS // max_length) if flex else 1
        # No checkpointing at all is not offered by default: compiled, it did not finish compiling
        # within 150 s in the bench (twice, cause not found); eager it ran (18.3k tok/s, 75 GiB).
        ckpt = 2 if gib >= HALF_CHECKPOINT_MIN_GIB else 1
        p = SpeedPlan("fast", reason, rows=rows, max_length=max_length, checkpoint_every=ckpt,
                      compile=True, dequantize_once=model_cfg.load_in_4bit,
                      attn_implementation="flex_attention" if flex else "sdpa", bf16_frozen=bf16)
    else:
        rows = max(1, SMALL_TOKENS // max_length) if flex else 1
        p = SpeedPlan("small", reason, rows=rows, max_length=max_length, checkpoint_every=1,
                      compile=False, dequantize_once=False,
                      attn_implementation="flex_attention" if flex else "sdpa", bf16_frozen=bf16)
    if train_cfg.gradient_checkpointing is True:
        p = replace(p, checkpoint_every=1)
    elif train_cfg.gradient_checkpointing is False:
        # Compiled layers without checkpointing never finished compiling in the bench: run eager.
        p = replace(p, checkpoint_every=0, compile=False)
    # train.step_tokens per optimizer step: accumulate micro-batches, or take fewer rows when the
    # step is smaller than one micro-batch.
    rows = max(1, min(p.rows, train_cfg.step_tokens // max(1, p.max_length)))
    accum = max(1, round(train_cfg.step_tokens / (rows * p.max_length)))
    return replace(p, rows=rows, grad_accum=accum)


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sft_overrides(speed: SpeedPlan, train_cfg: TrainConfig) -> dict[str, Any]:
    """SFTConfig keyword arguments for this plan (empty for the plain path)."""
    if speed.path == "plain":
        return {}
    return {
        "packing": True,
        "packing_strategy": "bfd",  # whole examples per row; TRL then turns padding-free on
        "padding_free": True,
        "max_length": speed.max_length,
        "per_device_train_batch_size": speed.rows,
        "per_device_eval_batch_size": speed.rows,
        "gradient_accumulation_steps": speed.grad_accum,
        # One shape for every batch (the flattened rows are padded with 1-token pseudo-examples
        # whose labels are -100), so compiled layers never recompile.
        "pad_to_multiple_of": speed.tokens_per_microbatch,
        "gradient_checkpointing": speed.checkpoint_every > 0,
        "gradient_checkpointing_kwargs": ({"use_reentrant": False, "every_n_layers": speed.checkpoint_every}
                                          if speed.checkpoint_every > 0 else None),
    }


# ----------------------------------------------------------------------------- model surgery

def prepare(model: Any, speed: SpeedPlan) -> dict[str, Any]:
    """Apply the plan to the (PEFT-wrapped) model, after SFTTrainer is built and before train().

    Returns what was done, for the training report.
    """
    if speed.path == "plain":
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done: dict[str, Any] = {}
    if speed.bf16_frozen:
        done["bf16_frozen_params"] = cast_frozen(base)
    attn = speed.attn_implementation
    if attn == "flex_attention":
        attn = register_flex()
    if attn and base.config._attn_implementation != attn:
        base.set_attn_implementation(attn)
    done["attn_implementation"] = base.config._attn_implementation
    if speed.dequantize_once:
        done["dequantized_gib"] = round(dequantize_once(base) / 2**30, 2)
    if speed.compile:
        done["compiled_layers"] = compile_layers(base)
    return done


def cast_frozen(model: Any, dtype: Any = None) -> int:
    """Cast frozen floating-point parameters that are wider than the compute dtype (fp32 norms,
    embeddings, LM head left by prepare_model_for_kbit_training) down to it. Returns how many."""
    import torch

    dtype = dtype or torch.bfloat16
    n = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(dtype)
            n += 1
    return n


FLEX = "prodtune_flex"
"""transformers' FlexAttention with contiguous q/k/v (see `register_flex`)."""


def register_flex() -> str:
    """Register FLEX with transformers' attention and mask interfaces; return its name.

    Inside a compiled layer, inductor (torch 2.13, seen on the CPU) fused RoPE into the flex
    kernel's non-contiguous q/k inputs and got wrong results; eager flex, or contiguous inputs,
    are right. Making q/k/v contiguous costs one copy that the compiled RoPE writes anyway.
    """
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    def flex_contiguous(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
        return flex_attention_forward(module, query.contiguous(), key.contiguous(), value.contiguous(),
                                      attention_mask, **kwargs)

    AttentionInterface.register(FLEX, flex_contiguous)
    AttentionMaskInterface.register(FLEX, flex_attention_mask)
    return FLEX


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def dequantize_once(model: Any) -> int:
    """Give every LoRA layer over a bitsandbytes 4-bit weight a bf16 copy of that weight and a
    forward that uses it. Returns the bytes held by the copies.

    The copy holds exactly the values bitsandbytes dequantizes on each call (the base is frozen),
    so outputs and gradients are unchanged; the 4-bit weight stays in place for saving/merging.
    """
    import bitsandbytes as bnb

    total = 0
    for layer in _lora_layers(model):
        base = layer.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        weight = base.weight
        dtype = base.compute_dtype or weight.quant_state.dtype
        w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        # Not persistent: checkpoints and saved adapters stay as they were.
        layer.register_buffer("prodtune_weight", w.contiguous(), persistent=False)
        layer.prodtune_forward_4bit = layer.forward
        layer.forward = types.MethodType(_lora_forward_dense, layer)
        total += w.numel() * w.element_size()
    return total


def _lora_forward_dense(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's LoRA forward for a 4-bit base, with the bf16 copy of the base weight:
    y = x W^T + scale * B(A(dropout(x))); anything unusual goes to peft's own forward."""
    import torch.nn.functional as F

    if args or kwargs or self.disable_adapters or self.merged:
        return self.prodtune_forward_4bit(x, *args, **kwargs)
    w = self.prodtune_weight
    bias = self.get_base_layer().bias
    out = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, bias)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    for name in self.active_adapters:
        if name not in self.lora_A or name in self.lora_variant:
            if name in self.lora_A:  # DoRA and other variants: not worth a special case
                return self.prodtune_forward_4bit(x, *args, **kwargs)
            continue
        a = self.lora_A[name]
        xa = self.lora_dropout[name](x)
        if xa.dtype != a.weight.dtype:
            xa = xa.to(a.weight.dtype)
        out = out + (self.lora_B[name](a(xa)) * self.scaling[name]).to(out.dtype)
    return out


def decoder_layers(model: Any) -> list[Any]:
    """The repeated decoder blocks (transformers' GradientCheckpointingLayer instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: Any, backend: Any = "inductor") -> int:
    """torch.compile each decoder layer's forward (checkpointing wraps it from outside).

    Layers share one compiled graph; the varlen keyword arguments are dropped first (see
    VARLEN_KWARGS). `backend` is torch.compile's (tests pass a counting one). Returns the
    number of layers compiled.
    """
    import torch

    # 32 identical layers: let the one code object hold enough cache entries for train and eval.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 512)
    layers = decoder_layers(model)
    for layer in layers:
        compiled = torch.compile(layer.forward, backend=backend)

        def forward(*args: Any, _compiled: Any = compiled, **kwargs: Any) -> Any:
            for key in VARLEN_KWARGS:
                kwargs.pop(key, None)
            return _compiled(*args, **kwargs)

        layer.forward = forward
    return len(layers)
