"""The training loss's LM head without reading the GPU back: labelled positions listed where the batch is made.

TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) projects only the positions that have a
label, through its chunked log-prob kernel, so the logits are never built. It finds those positions
on the GPU with a boolean mask (`hidden[labels != -100]`), whose size the host must read back: twice
in the forward, twice in the backward (the index's and `masked_scatter`'s), each read emptying the
GPU's queue. On the fast path that was ~10 ms of idle GPU per optimizer step on an H200
(bench/NOTES.md). The collator holds the labels on the host already, so `LabelPositions` lists the
positions there, and the model's forward (`select_by_position`) gathers those rows by index (no read)
and hands them to TRL's own kernel (`trl.kernels.ChunkedLogProbFunction`). TRL has no switch for this;
the few lines below are its default branch with an index instead of a mask, and they return TRL's
`FusedCausalLMOutput` with the same shapes and values. Everything else (scaled or soft-capped logits,
MoE router losses, pre-shifted labels, a micro-batch without labels) goes to TRL's forward unchanged.
"""

from __future__ import annotations

import functools
import types
from typing import Any

POSITIONS = "label_positions"
"""The batch key: indices into the flattened (rows, length - 1) grid of next-token labels that are not -100."""

# Config keys that change the logits before the softmax; TRL's forward handles them, this path does not.
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")
# The per-token outputs TRL's SFTTrainer asks its fused head for.
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def label_positions(labels: Any) -> Any:
    """Where the next-token labels of `labels` (rows x length, -100 = not trained on) are trained on,
    as indices into the flattened (rows, length - 1) grid TRL's per-token outputs use."""
    return (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)


class LabelPositions:
    """A collator wrapper adding `label_positions` (computed on the CPU, where the collator runs)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collate(examples)
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 2 and labels.size(1) > 1:
            batch[POSITIONS] = label_positions(labels)
        return batch


def plain_head(config: Any) -> bool:
    """Whether a model's logits are the LM head's output as is (no scale, soft cap or router loss)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (all(getattr(text, key, None) in (None, 1, 1.0) for key in _SCALED_LOGITS)
            and not getattr(text, "output_router_logits", False))


def select_by_position(causal_lm: Any, outputs: tuple[str, ...] = SFT_OUTPUTS) -> bool:
    """Let `causal_lm`'s fused forward (TRL's `add_fused_lm_head`, added already) take `label_positions`.

    Returns False, changing nothing, when the model has no fused head or its logits are scaled.
    With the positions, `forward(..., labels=, fused_lm_head=True, label_positions=)` scores only
    those positions, found by index; without them it is TRL's forward. Either way the positions never
    reach the backbone."""
    fused = vars(causal_lm).get("forward")  # TRL puts its fused forward on the instance
    if getattr(fused, "selects_by_position", False):
        return True
    if (not isinstance(fused, types.MethodType) or "fused_lm_head" not in fused.__func__.__code__.co_varnames
            or not plain_head(causal_lm.config) or not _trl_kernel()):
        return False

    @functools.wraps(type(causal_lm).forward)  # generate() checks model kwargs against this signature
    def forward(self: Any, *args: Any, label_positions: Any = None, **kwargs: Any) -> Any:
        if (label_positions is None or not label_positions.numel() or not kwargs.get("fused_lm_head")
                or kwargs.get("labels") is None or kwargs.get("shift_labels") is not None):
            return fused(*args, **kwargs)  # an all-unlabelled micro-batch too: TRL's differentiable zero
        return _score_positions(self, args, kwargs, label_positions, outputs)

    forward.selects_by_position = True
    causal_lm.forward = types.MethodType(forward, causal_lm)
    return True


def _score_positions(model: Any, args: tuple, kwargs: dict[str, Any], positions: Any,
                     outputs: tuple[str, ...]) -> Any:
    """TRL's fused forward (default branch) with the labelled rows gathered by index."""
    from torch.distributed.tensor import DTensor
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    kwargs.pop("fused_lm_head")
    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state
    rows, length, width = hidden.shape
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):  # FSDP2 shards the head; the kernel needs it whole
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    positions = positions.to(weight.device)
    shifted = labels[:, 1:].to(weight.device)
    # Position p of the (rows, length - 1) grid is row p // (length - 1), token p % (length - 1): that
    # token's hidden state is row-major index p + p // (length - 1) of the (rows, length) states.
    picked = hidden.to(weight.device).reshape(-1, width).index_select(0, positions + positions // (length - 1))
    targets = shifted.reshape(-1).index_select(0, positions)
    with maybe_gather_lm_head_ctx(weight, bias):
        per_token = ChunkedLogProbFunction.apply(picked, weight, bias, targets, 1.0, _chunk_size(), None, 1.0,
                                                 outputs)
    # Back onto the grid (zero where unlabelled, as TRL returns them); index_copy's backward is a gather.
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(shifted.numel()).index_copy(0, positions, x).view(shifted.shape)
        for x in per_token)
    mask = shifted != -100
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)


def _trl_kernel() -> bool:
    """Whether this TRL has the pieces `_score_positions` calls (TRL 1.16's names and signature)."""
    import inspect

    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx  # noqa: F401
    except ImportError:
        return False
    return "outputs" in inspect.signature(ChunkedLogProbFunction.forward).parameters


def _chunk_size() -> int:
    """The vocabulary tile TRL's fused head uses."""
    from trl.trainer import utils

    return getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
