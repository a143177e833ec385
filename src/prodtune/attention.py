"""Attention for packed rows: each example attends to itself only, whatever shares its row.

TRL's padding-free collator flattens a micro-batch into one sequence and gives the example
boundaries (cu_seq_lens_q/k) beside restarting position ids. `varlen_attention` hands them to
flash attention's variable-length kernel, registered with transformers as VARLEN; FLEX is
transformers' FlexAttention with its document mask, kept for comparison (bench). `steady_kwargs`
keeps what reaches compiled decoder layers the same from batch to batch.
"""

from __future__ import annotations

from typing import Any

VARLEN = "prodtune_varlen"
"""Attention implementation name of `varlen_attention` in transformers' registries."""
FLEX = "prodtune_flex"
"""transformers' FlexAttention with contiguous q/k/v (see `register_flex`)."""

# Keyword arguments TRL's padding-free collator adds for variable-length kernels. The example
# boundaries (cu_seq_lens_*) are what varlen attention needs; the rest change value or shape with
# every batch and would make compiled layers recompile, so they are replaced or dropped first.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
LONGEST = "prodtune_longest"
"""The keyword argument carrying the micro-batch's longest example as a tensor's length (see steady_kwargs)."""


def steady_kwargs(max_length: int, keep_boundaries: bool, longest: int | None = None, per_batch: bool = True) -> Any:
    """A forward pre-hook for the decoder stack: what reaches the layers keeps one type and value
    from batch to batch, so compiled layers do not recompile. With varlen attention the example
    boundaries stay (their length changes: marked dynamic). So does the micro-batch's longest
    example, which sizes flash attention's grid (blocks past an example's end still launch: with
    ~70 examples of ~240 tokens per micro-batch most of the kernel's time went to them). An int would
    be a constant of the compiled graph (a recompile per value), so it travels as the length of a
    small CPU tensor (`LONGEST`, a dynamic dimension). The int arguments become a constant: `longest`
    (the data's longest example), or the row length `max_length` for a batch whose own longest (TRL's
    collator gives it) is longer; with `per_batch=False` (bench only) they are all the kernel gets.
    Otherwise the varlen keyword arguments are dropped."""
    import torch

    bound = min(longest or max_length, max_length)

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs.pop("seq_idx", None)
        if keep_boundaries and kwargs.get("cu_seq_lens_q") is not None:
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                torch._dynamo.maybe_mark_dynamic(kwargs[key], 0)
            here = kwargs.get("max_length_q")
            fits = isinstance(here, int) and here <= bound
            kwargs["max_length_q"] = kwargs["max_length_k"] = bound if fits else max_length
            if isinstance(here, int) and per_batch:
                # >= 2: dynamo specializes lengths 0 and 1
                kwargs[LONGEST] = torch.empty(max(2, min(here, max_length)), dtype=torch.uint8)
                torch._dynamo.maybe_mark_dynamic(kwargs[LONGEST], 0)
        else:
            for key in VARLEN_KWARGS:
                kwargs.pop(key, None)
        return args, kwargs

    return hook


class OnePaddingSegment:
    """A collator wrapper: the padding at the end of a padding-free micro-batch becomes one segment.

    TRL pads the flattened rows to one shape with pad tokens at position 0, which its boundaries
    (cu_seq_lens_*) count as one 1-token example each: ~180 of the ~250 "examples" of a 16k-token
    micro-batch of AmazonTitles-sized examples, and flash attention's varlen kernel launches work for
    every one of them. Joined into one segment they cost what one example does. Nothing trained
    changes: those positions have label -100 and attend only among themselves (a real example of
    1 token, had one ended a batch, would still see only itself: attention is causal).
    Runs where the collator runs (the dataloader's worker, on the CPU).
    """

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        import torch

        batch = self.collate(examples)
        cu = batch.get("cu_seq_lens_q")
        if cu is None or cu.dim() != 1 or cu.numel() < 3:
            return batch
        lengths = cu.diff()
        not_one = (lengths != 1).nonzero()
        keep = int(not_one[-1]) + 1 if len(not_one) else 0  # segments before the trailing 1-token run
        if lengths.numel() - keep < 2:
            return batch
        cu = torch.cat([cu[:keep + 1], cu[-1:]])
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = int(cu.diff().max())
        if "seq_idx" in batch:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(cu.numel() - 1, dtype=batch["seq_idx"].dtype),
                                                       cu.diff())[None]
        return batch


def register_varlen() -> str:
    """Register `varlen_attention` with transformers' attention interface; return its name.

    No mask function is registered: the example boundaries are the mask, and for an attention
    implementation without one transformers (>= 4.56) builds no mask and skips its check for packed
    sequences, which reads the GPU back at the start of every forward."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Causal attention within each packed example and never across: flash attention's
    variable-length kernel over the boundaries in cu_seq_lens_q (transformers' attention signature,
    q/k/v as [1, heads, tokens, head_dim]). Without boundaries it is transformers' SDPA.

    Hand-written because transformers reaches this kernel only through the flash-attn package
    (no wheels for the GPU image, none on a T4), while torch ships it as aten._flash_attention_forward
    with its backward; on a CPU a dense reference of the same mask runs (tests).
    """
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    longest = kwargs.pop(LONGEST, None)
    if cu is None or query.shape[0] != 1 or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    # [1, heads, tokens, dim] -> [tokens, heads, dim], the layout the kernel reads.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    # The batch's own longest (symbolic inside a compiled layer: no int(), which would fix its value),
    # within `bound`, a constant from batch to batch (steady_kwargs).
    bound = int(kwargs.get("max_length_q") or q.shape[0])
    max_len = longest.shape[0] if longest is not None else bound
    dtype = q.dtype
    if q.is_cuda and dtype not in (torch.float16, torch.bfloat16):  # the kernel's dtypes; fp32 models too
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    if q.is_cuda:
        window = kwargs.get("sliding_window")
        # Decided on the constant bound, not the batch's length (a guard, and a recompile, on it):
        # a window longer than every example of a batch changes nothing there.
        extra = {"window_size_left": window - 1, "window_size_right": 0} if window and bound > window else {}
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, kwargs.get("cu_seq_lens_k", cu), max_len, max_len, 0.0, True, False,
            scale=scaling, **extra)[0]
    else:
        out = _varlen_reference(q, k, v, cu, scaling)
    return out.to(dtype).unsqueeze(0), None


def _varlen_reference(q: Any, k: Any, v: Any, cu: Any, scale: float | None) -> Any:
    """The same attention with a dense [tokens, tokens] mask: for CPU tests, never for speed."""
    import torch
    import torch.nn.functional as F

    n = q.shape[0]
    pos = torch.arange(n, device=q.device)
    doc = torch.searchsorted(cu[1:].to(torch.int64), pos, right=True)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def register_flex() -> str:
    """Register FLEX with transformers' attention and mask interfaces; return its name.

    Kept to compare against varlen attention (bench). Inside a compiled layer, inductor (torch
    2.13, seen on the CPU) fused RoPE into the flex kernel's non-contiguous q/k inputs and got
    wrong results; contiguous inputs are right.
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
