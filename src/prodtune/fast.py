"""GPU training speed: the 'fast' and 'small' paths on top of TRL's SFTTrainer.

The plain QLoRA recipe (batch 2 x 4, padded, every weight dequantized from 4 bits three times per
micro-batch, fp32 residual stream) keeps an H100 about 2% busy. What these paths change, and why:

* Padding-free packing (TRL's best-fit-decreasing packing): whole examples are packed into rows of
  `max_length` tokens and a micro-batch is `rows` such rows flattened into one sequence, so no
  padding is computed. Position ids restart at 0 for every example; labels stay -100 on prompt
  tokens and on each example's first token (TRL's padding-free collator does both). The row is
  padded to exactly rows * max_length so that every batch has one shape (compiled code is reused).
* No attention across examples: flash attention's variable-length kernel (`varlen_attention`)
  over the example boundaries TRL's collator computes. It skips other examples entirely, needs no
  mask and no compilation (FlexAttention, used before, spent ~44 s compiling its kernels).
* Big token batches: 16k tokens per micro-batch (8k on the small path, whose checkpointed layer
  inputs wait in CPU memory: TRL's activation offloading), so each weight matrix is used on many rows.
* Dequantize once (fast path): the base is frozen, so its NF4 weights dequantize to the same bf16
  values on every call. We dequantize each once, keep the bf16 copy (7.6 GB for Phi-3-mini) and
  run plain bf16 matmuls: the same numbers bitsandbytes would compute, without 3 dequantizations
  per weight per micro-batch, and code that torch.compile can fuse.
* bf16 residual stream: peft's prepare_model_for_kbit_training casts the frozen norms, embeddings
  and LM head to fp32, which makes every activation fp32. They are frozen, so we cast them back.
* Regional compilation: the decoder block is compiled once and the same graph runs every layer
  (identical layers differ only in their weights, which are graph inputs), fusing RMSNorm, RoPE,
  SiLU*up and the LoRA scale-and-add: ~10 s before the first step on an H200 (~190 s before,
  FlexAttention's kernels compiled inside each layer). The small path compiles its 4-bit layers too.
* Checkpointing chosen from memory: recomputing the forward costs 2N of the 6N FLOPs per token,
  so cards of >= 120 GiB keep every activation (4N), 80 GB cards checkpoint every other layer
  (5N), smaller ones every layer.
* Cross-entropy: TRL >= 1.16 already projects through the LM head in chunks and only at labelled
  positions (its fused LM head), so the full fp32 logits are never built. The collator lists those
  positions on the CPU, and the head selects them by index, not with a boolean mask whose size the
  host would read back from the GPU (`lm_head`).
* No waiting for the GPU inside a step (`trainer_class`): transformers and TRL read token counts and
  metrics back with `.item()` on every micro-batch; each such read empties the GPU's queue, and the
  Python work after it (the 8-bit AdamW's 448 launches, the next batch) then runs on an idle GPU.
  Here they are counted on the GPU and read back later, without stopping it, and a log's values
  are read one optimizer step late, when the GPU has long computed them.
* Attention sized to the data: flash attention's kernel launches work for every example, sized to the
  longest it is told of: each micro-batch's longest example (a dynamic length, not a recompile),
  not the 2048-token row, and the padding at the end of a micro-batch is one segment, not ~180
  one-token examples (`OnePaddingSegment`).

bench/NOTES.md has the measurements. prodtune.plan and train.py use it as:

    speed = fast.plan(cfg.train, cfg.model, device)            # plan.make_plan
    args = SFTConfig(..., **fast.sft_overrides(speed))         # train.sft_config
    trainer = SFTTrainer(...)
    trainer = fast.trainer_class(speed)(...)                   # train.build_trainer
    fast.prepare_trainer(trainer, speed, compile_cache)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from prodtune import lm_head
from prodtune.attention import FLEX, VARLEN, OnePaddingSegment, register_flex, register_varlen, steady_kwargs
from prodtune.config import ModelConfig, TrainConfig
from prodtune.errors import UserError

SpeedPath = Literal["plain", "fast", "small"]

FAST_MIN_GIB = 40.0
"""Cards with at least this much memory take the fast path; smaller ones the small path."""
FAST_TOKENS = 16384
"""Tokens per micro-batch on the fast path (8 rows of 2048)."""
SMALL_TOKENS = 8192
"""Tokens per micro-batch on the small path (4 rows of 2048), with the checkpointed layer inputs
offloaded to CPU memory: 4.08 GiB for Phi-3-mini's shape at 17.5k tokens/s on an H200 (without
offloading 8192 took 5.4 GiB; 4096 took 3.95 GiB at 13.3k tokens/s)."""
SMALL_TOKENS_RESIDENT = 4096
"""Tokens per micro-batch on the small path where nothing is offloaded (under FSDP)."""
HALF_CHECKPOINT_MIN_GIB = 70.0
"""Fast-path cards with at least this much memory (H100/A100 80 GB) checkpoint every other layer
(5N FLOPs/token, 37.6 GiB peak measured); smaller ones every layer (6N, 15 GiB)."""
NO_CHECKPOINT_MIN_GIB = 120.0
"""Fast-path cards with at least this much memory (H200) keep every activation (4N FLOPs/token)."""



@dataclass(frozen=True)
class SpeedPlan:
    """How this run trains on this machine; settled once by `plan`."""

    path: SpeedPath
    """plain = TRL as configured; fast = packed, varlen attention, bf16 base copy, compiled; small = packed, 4-bit live."""
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
    """torch.compile the decoder block once for every layer (regional compilation)."""
    dequantize_once: bool = False
    """Replace on-the-fly 4-bit dequantization by a bf16 copy of the frozen base."""
    attn_implementation: str | None = None
    """Attention kernel: VARLEN, FLEX, 'sdpa' (cards without flash attention), None = leave it."""
    bf16_frozen: bool = False
    """Cast frozen fp32 norms/embeddings/LM head back to bf16 (bf16 residual stream)."""
    offload: bool = False
    """Keep the checkpointed layers' inputs in pinned CPU memory until the backward needs them
    (TRL's activation offloading, copies on a side stream): twice the tokens per micro-batch in the
    same memory. Only with every layer checkpointed (otherwise every activation would cross the bus)."""

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
        """One line: the path, why, and what it does."""
        if self.path == "plain":
            return f"plain ({self.reason})"
        ckpt = {0: "no checkpointing", 1: "checkpointing every layer"}.get(
            self.checkpoint_every, f"checkpointing every {self.checkpoint_every}th layer")
        attn = {VARLEN: "varlen flash attention", FLEX: "FlexAttention"}.get(
            self.attn_implementation or "", self.attn_implementation or "default attention")
        parts = [f"{self.rows}x{self.max_length} packed tokens x {self.grad_accum} accumulation", ckpt, attn]
        if self.offload:
            parts.append("checkpoints offloaded to CPU memory")
        if self.dequantize_once:
            parts.append("bf16 copy of the 4-bit base")
        if self.compile:
            parts.append("compiled decoder block")
        return f"{self.path} ({self.reason}): " + ", ".join(parts)


def card_memory_gib(device: Any = "cuda") -> float:
    """Total memory of the CUDA card in GiB (0 when there is none)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(device).total_memory / 2**30


@dataclass(frozen=True)
class Card:
    """What the plan needs to know of a CUDA card."""

    memory_gib: float
    capability: tuple[int, int]
    """Compute capability: (8, 0) and newer have flash attention's kernels; a T4 is (7, 5)."""
    bf16: bool


def read_card(device: Any = "cuda") -> Card:
    """The card of a CUDA device."""
    import torch

    return Card(card_memory_gib(device), tuple(torch.cuda.get_device_capability(device)),
                torch.cuda.is_bf16_supported())


def plan(train_cfg: TrainConfig, model_cfg: ModelConfig, device: Any, card: Card | None = None,
         sharded: bool = False) -> SpeedPlan:
    """Choose the training path from train.speed and the card: fast on cards of >= 40 GiB,
    small below (Phi-3-mini in ~4 GiB), plain on a CPU or when asked.

    `card` describes another card than the device's (planning for it; tests without a GPU).
    `sharded`: under FSDP, whose flat parameters are not what torch.compile traces and whose
    offloading of activations is not measured: the small path then runs eagerly, nothing offloaded.
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
    card = card or read_card(device)
    gib = card.memory_gib
    if speed == "auto":
        speed = "fast" if gib >= FAST_MIN_GIB else "small"
        reason = f"auto: {gib:.0f} GiB card"
    else:
        reason = f"train.speed={speed}"
    max_length = train_cfg.max_length
    # Flash attention's kernels need Ampere or newer. On a T4 (sm75) SDPA gets transformers' dense
    # document mask, which costs (row length)^2: one row per micro-batch there.
    varlen = card.capability[0] >= 8
    # fp16 cards (T4) keep peft's fp32 norms/embeddings: an fp16 residual stream could overflow.
    bf16 = card.bf16
    attn = VARLEN if varlen else "sdpa"
    if speed == "fast":
        rows = max(1, FAST_TOKENS // max_length) if varlen else 1
        ckpt = 0 if gib >= NO_CHECKPOINT_MIN_GIB else 2 if gib >= HALF_CHECKPOINT_MIN_GIB else 1
        p = SpeedPlan("fast", reason, rows=rows, max_length=max_length, checkpoint_every=ckpt,
                      compile=not sharded, dequantize_once=model_cfg.load_in_4bit, attn_implementation=attn,
                      bf16_frozen=bf16)
    else:
        # Compiled too (4-bit matmuls and all, one graph for every layer) and offloading, except on
        # pre-Ampere cards (T4), where both are unmeasured, and under FSDP.
        fitted = varlen and not sharded
        tokens = SMALL_TOKENS if fitted else SMALL_TOKENS_RESIDENT
        rows = max(1, tokens // max_length) if varlen else 1
        p = SpeedPlan("small", reason, rows=rows, max_length=max_length, checkpoint_every=1,
                      compile=fitted, dequantize_once=False, attn_implementation=attn, bf16_frozen=bf16,
                      offload=fitted)
    if train_cfg.gradient_checkpointing is True:
        p = replace(p, checkpoint_every=1)
    elif train_cfg.gradient_checkpointing is False:
        p = replace(p, checkpoint_every=0)
    if p.checkpoint_every != 1:
        p = replace(p, offload=False)
    rows, accum = step_split(p.rows, p.max_length, train_cfg.step_tokens)
    return replace(p, rows=rows, grad_accum=accum)


def step_split(max_rows: int, row_tokens: int, step_tokens: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) for step_tokens tokens per optimizer step in
    rows of row_tokens: accumulate micro-batches of at most max_rows rows, or take fewer rows when
    the step is smaller than one micro-batch."""
    rows = max(1, min(max_rows, step_tokens // max(1, row_tokens)))
    return rows, max(1, round(step_tokens / (rows * row_tokens)))


def sft_overrides(speed: SpeedPlan) -> dict[str, Any]:
    """SFTConfig keyword arguments that only the speed paths set (empty for the plain path); the
    micro-batch, accumulation and packing come from the plan's batch, as on every path."""
    if speed.path == "plain":
        return {}
    return {
        "packing_strategy": "bfd",  # whole examples per row; TRL then turns padding-free on
        "padding_free": True,
        "per_device_eval_batch_size": speed.rows,
        # One shape for every batch (the flattened rows are padded with 1-token pseudo-examples
        # whose labels are -100), so compiled layers never recompile.
        "pad_to_multiple_of": speed.tokens_per_microbatch,
        "gradient_checkpointing": speed.checkpoint_every > 0,
        "activation_offloading": speed.offload,
        # Collate the next micro-batch (~10-20 ms of Python for 16k tokens) while the GPU works.
        "dataloader_num_workers": 1,
        "gradient_checkpointing_kwargs": ({"use_reentrant": False, "every_n_layers": speed.checkpoint_every}
                                          if speed.checkpoint_every > 0 else None),
        # Each check of a loss for NaN is a read of the GPU (an emptied queue); a NaN loss then shows in
        # the logged loss instead of being replaced by the running mean.
        "logging_nan_inf_filter": False,
        # Batches go to the GPU from pinned memory without waiting for the work queued before them.
        "dataloader_pin_memory": True,
        "accelerator_config": {"non_blocking": True},
    }


def trainer_class(speed: SpeedPlan) -> type:
    """The trainer class of a plan: TRL's SFTTrainer on the plain path (the reference), its subclass
    that never waits for the GPU inside an optimizer step on the speed paths."""
    from trl import SFTTrainer

    return SFTTrainer if speed.path == "plain" else _sync_free_trainer()


@functools.cache
def _sync_free_trainer() -> type:
    """SFTTrainer whose training step never reads the GPU back (one class, made on first use: trl is
    imported only when training)."""
    import inspect

    import torch
    from trl import SFTTrainer

    # Which of transformers' arguments are the start time and learning rate (looked up once).
    _LOG_SAVE_EVALUATE = inspect.signature(SFTTrainer._maybe_log_save_evaluate)

    class SyncFreeSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer, with its per-micro-batch reads of the GPU moved out of the step.

        Written by hand because neither library has a switch for it: transformers' training loop
        counts each micro-batch's tokens with `.item()` after its backward, and TRL's compute_loss
        reads entropy, token accuracy and token count with `.item()`s after its forward. Each read
        waits until the GPU has finished all queued work; what follows it (the optimizer's per-tensor
        launches, callbacks, the next batch) then runs while the GPU idles (with bitsandbytes' syncs,
        80-100 ms of a ~600 ms fast-path step on an H200; bench/NOTES.md, rounds 3 and 4). Here:

        * tokens are counted on the GPU as each batch arrives, before its forward is queued, and come
          back through pinned memory; the count is read after the backward is queued, waiting at
          most until the GPU has started that micro-batch (the queue stays full). The number in
          the trainer's state is the same as transformers' own, step for step.
        * the metrics are summed on the GPU and read once per log: entropy and token accuracy are
          then token-weighted over the logging window (TRL averages per-micro-batch ratios).
        * bitsandbytes' 8-bit AdamW steps without synchronizing the device after every tensor
          (`step_without_device_syncs`).
        * a log is written one optimizer step late: at a logging step its values (loss, gradient
          norm, metric sums) are copied to pinned memory without waiting, and read when the next
          step has been queued, by which time the GPU has long computed them. Reading them at once
          emptied the GPU's queue at every logged step, and the GPU then idled through the Python
          between two steps (~15 ms of every ~550 ms step with `logging_steps: 1`). The log itself is
          the same: the same values, the step, epoch and tokens of the step it describes. Steps
          that evaluate or save log at once, as before.
        * anything else (evaluation, other losses, outputs asked for) is TRL's own code.
        """

        late_logs = True
        """Write each log one step late (False: at its step, reading the GPU as transformers does)."""
        _token_counts: list[tuple[Any, Any]]
        _metric_sums: Any = None
        _pending_log: dict[str, Any] | None = None
        _writing_late_log = False  # log() then finds its metrics set from the late log's values

        def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
            optimizer = super().create_optimizer(*args, **kwargs)
            step_without_device_syncs(optimizer)
            return optimizer

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self.args.include_num_input_tokens_seen != "no":
                self._token_counts = [self._count_tokens(batch) for batch in batches]
            return batches, num_items

        def _count_tokens(self, inputs: dict[str, Any]) -> tuple[Any, Any]:
            """(count, event): this micro-batch's tokens over all processes, counted as transformers'
            Trainer counts them, in pinned memory once `event` has passed (None on a CPU)."""
            name = getattr(self.model, "main_input_name", "input_ids")
            ids = inputs[name]
            pad = getattr(self.processing_class, "pad_token_id", None)
            if self.args.include_num_input_tokens_seen == "non_padding" and "attention_mask" in inputs:
                n = inputs["attention_mask"].sum()
            elif self.args.include_num_input_tokens_seen == "non_padding" and pad is not None:
                n = (ids != pad).sum()
            else:
                n = torch.full((), ids.numel(), device=ids.device)  # a fill, not a copy that waits
            n = self.accelerator.gather(n.to(torch.int64).reshape(1)).sum()
            if n.device.type != "cuda":
                return n, None
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(n, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            if self.args.include_num_input_tokens_seen == "no":
                return
            if not getattr(self, "_token_counts", None):  # not from get_batch_samples: count as transformers does
                return super()._track_num_input_tokens(inputs)
            count, event = self._token_counts.pop(0)
            if event is not None:
                event.synchronize()  # recorded before this micro-batch's forward was queued
            self.state.num_input_tokens_seen += int(count)

        def _own_loss(self) -> bool:
            """Whether TRL's compute_loss would take its default branch (the nll loss of its fused LM head)."""
            pc = getattr(self.accelerator, "parallelism_config", None)
            return (self.compute_loss_func is None and self.label_smoother is None
                    and self.args.loss_type == "nll" and not self.aux_loss_enabled
                    and not (pc is not None and getattr(pc, "sp_enabled", False)))

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if return_outputs or not self.model.training or not self._own_loss():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # TRL's default branch, without its metric reads.
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            mask = outputs.label_mask
            n = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(n).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = torch.full((), inputs["position_ids"].size(1), device=mask.device)
            sums = torch.stack([mask.sum().double(), outputs.entropy.detach().sum().double(),
                                outputs.is_top1.sum().double(), tokens.double()])
            self._metric_sums = sums if self._metric_sums is None else self._metric_sums + sums
            return loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self._metric_sums is not None and self.model.training and not self._writing_late_log:
                self._set_metrics(self._take_metric_sums().tolist())
            super().log(logs, start_time)

        def _take_metric_sums(self) -> Any:
            """The metric sums since the last log, over all processes (a gather, no read), reset."""
            # Every process logs at the same step, so this gather meets its peers.
            sums = self.accelerator.gather(self._metric_sums.unsqueeze(0)).sum(0)
            self._metric_sums = None
            return sums

        def _set_metrics(self, sums: list[float]) -> None:
            valid, entropy, correct, tokens = sums
            self._total_train_tokens += int(tokens) // self._tp_size
            metrics = self._metrics["train"]
            metrics["entropy"] = [entropy / valid if valid > 0 else 0.0]
            metrics["mean_token_accuracy"] = [correct / valid if valid > 0 else 0.0]
            metrics["num_tokens"] = [self._total_train_tokens]

        def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, model: Any, *args: Any,
                                     **kwargs: Any) -> None:
            should_log = self.control.should_log
            self._write_pending_log()  # its on_log resets control.should_log, which is this step's
            control, state = self.control, self.state
            control.should_log = should_log
            if (self.late_logs and control.should_log and state.global_step > self._globalstep_last_logged
                    and not control.should_evaluate and not control.should_save):
                call = _LOG_SAVE_EVALUATE.bind(self, tr_loss, grad_norm, model, *args, **kwargs).arguments
                self._defer_log(tr_loss, grad_norm, call.get("start_time"), call.get("learning_rate"))
                control.should_log = False  # so transformers neither logs nor reads the loss now
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

        def _defer_log(self, tr_loss: Any, grad_norm: Any, start_time: float | None,
                       learning_rate: float | None) -> None:
            """transformers' logging step up to its reads: the values copied aside, `tr_loss` reset."""
            from transformers.trainer_pt_utils import nested_gather

            values = [nested_gather(tr_loss, self.args.parallel_mode).mean().reshape(1)]
            grad_is_tensor = isinstance(grad_norm, torch.Tensor)
            if grad_is_tensor:
                values.append(grad_norm.detach().reshape(1))
            sums = self._metric_sums is not None and self.model.training
            if sums:
                values.append(self._take_metric_sums())
            packed = torch.cat([v.to(torch.float64) for v in values])
            event = None
            if packed.is_cuda:
                host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host = packed
            tr_loss -= tr_loss  # queued after the copy above
            state = self.state
            self._pending_log = {
                "values": host, "event": event, "steps": state.global_step - self._globalstep_last_logged,
                "grad_norm": None if grad_is_tensor else grad_norm, "grad_is_tensor": grad_is_tensor,
                "sums": sums, "learning_rate": learning_rate if learning_rate is not None else self._get_learning_rate(),
                "start_time": start_time, "state": (state.global_step, state.epoch, state.num_input_tokens_seen)}
            self._globalstep_last_logged = state.global_step
            # Not store_flos(): across processes it reads the GPU; the FLOPs are stored at the end.

        def _write_pending_log(self) -> None:
            """Write the log deferred by `_defer_log`, as transformers would have written it then."""
            pending, self._pending_log = self._pending_log, None
            if pending is None:
                return
            if pending["event"] is not None:
                pending["event"].synchronize()  # recorded a whole step ago
            values = pending["values"].tolist()
            loss = values.pop(0)
            logs = {"loss": loss / pending["steps"]}
            grad_norm = values.pop(0) if pending["grad_is_tensor"] else pending["grad_norm"]
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["learning_rate"] = pending["learning_rate"]
            self._total_loss_scalar += loss
            if pending["sums"]:
                self._set_metrics(values)
            state = self.state
            now = (state.global_step, state.epoch, state.num_input_tokens_seen)
            state.global_step, state.epoch, state.num_input_tokens_seen = pending["state"]
            self._writing_late_log = True
            try:
                self.log(logs, pending["start_time"])
            finally:
                self._writing_late_log = False
                state.global_step, state.epoch, state.num_input_tokens_seen = now

    return SyncFreeSFTTrainer


def step_without_device_syncs(optimizer: Any) -> bool:
    """Make a bitsandbytes 8-bit optimizer step without waiting for the device after each tensor.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after every parameter's update: 448 times per
    step for LoRA on every linear layer of Phi-3-mini, 34 ms of a 570 ms fast-path step on an H200,
    the GPU idle between 10-us kernels. Only paged optimizers need it (their state is managed memory
    prefetched on stream 0); the others' kernels run on stream 0, the stream torch trains on, in order.
    So a non-paged optimizer steps with the syncs skipped whenever torch is on its default stream
    (bitsandbytes-foundation/bitsandbytes#2050 makes this change upstream). Returns whether it applies.
    """
    try:
        import bitsandbytes.optim.optimizer as bnb_optim
    except ImportError:
        return False
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, if any
    if not isinstance(inner, bnb_optim.Optimizer8bit) or getattr(inner, "is_paged", True):
        return False
    import torch

    step = inner.step

    @functools.wraps(step)
    def step_without_syncs(*args: Any, **kwargs: Any) -> Any:
        if not torch.cuda.is_available() or torch.cuda.current_stream() != torch.cuda.default_stream():
            return step(*args, **kwargs)
        synchronize = bnb_optim.sync_gpu
        bnb_optim.sync_gpu = _no_sync
        try:
            return step(*args, **kwargs)
        finally:
            bnb_optim.sync_gpu = synchronize

    inner.step = step_without_syncs
    return True


def _no_sync(tensor: Any) -> None:
    return None


def longest_example(*datasets: Any) -> int | None:
    """The most tokens of one example in these (tokenized, maybe packed) datasets, or None when
    none has token ids. Packed rows keep their examples' lengths in TRL's `seq_lengths`."""
    import pyarrow.compute as pc

    best = None
    for ds in datasets:
        for one in (ds.values() if isinstance(ds, dict) else [ds]):
            names = getattr(one, "column_names", None) or []
            table = getattr(one, "data", None)
            if "seq_lengths" in names:
                value = pc.max(pc.list_flatten(table.column("seq_lengths"))).as_py()
            elif "input_ids" in names:
                value = pc.max(pc.list_value_length(table.column("input_ids"))).as_py()
            else:
                continue
            if value is not None:
                best = max(best or 0, int(value))
    return best


# ----------------------------------------------------------------------------- model surgery

def prepare_trainer(trainer: Any, speed: SpeedPlan, compile_cache: str | Path | None = None) -> dict[str, Any]:
    """`prepare` for a built SFTTrainer's model; with varlen attention, sized to the longest example
    of its datasets and with each micro-batch's padding joined into one segment (its collator). On
    the speed paths the collator also lists the labelled positions, which the LM head then selects
    by index instead of reading a boolean mask's size back from the GPU (`lm_head`)."""
    if speed.path == "plain":
        return {}
    longest = None
    if speed.attn_implementation == VARLEN:
        longest = longest_example(trainer.train_dataset, trainer.eval_dataset)
        trainer.data_collator = OnePaddingSegment(trainer.data_collator)
    by_position = lm_head.select_by_position(_base_model(trainer.model))
    if by_position:
        trainer.data_collator = lm_head.LabelPositions(trainer.data_collator)
    return {**prepare(trainer.model, speed, compile_cache, longest),
            "lm_head": "labelled positions from the collator" if by_position else "TRL's (a boolean mask)"}


def _base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (the model itself without one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare(model: Any, speed: SpeedPlan, compile_cache: str | Path | None = None,
            longest: int | None = None) -> dict[str, Any]:
    """Apply the plan to the (PEFT-wrapped) model, after SFTTrainer is built and before train().

    `compile_cache` is where compiled kernels are kept for the next run (unless
    TORCHINDUCTOR_CACHE_DIR is set). `longest` is the longest example of the data (`longest_example`):
    varlen attention is sized to it (a batch with a longer one, which the data cannot have, gets the
    row length). Returns what was done, for the training report.
    """
    if speed.path == "plain":
        return {}
    base = _base_model(model)
    done: dict[str, Any] = {}
    if speed.bf16_frozen:
        done["bf16_frozen_params"] = cast_frozen(base)
    attn = speed.attn_implementation
    if attn == VARLEN:
        register_varlen()
    elif attn == "flex_attention" or attn == FLEX:
        attn = register_flex()
    if attn and base.config._attn_implementation != attn:
        base.set_attn_implementation(attn)
    done["attn_implementation"] = base.config._attn_implementation
    bound = min(longest, speed.max_length) if longest else speed.max_length
    if attn == VARLEN:
        done["attention_bound"] = bound
    base.get_decoder().register_forward_pre_hook(
        steady_kwargs(speed.max_length, keep_boundaries=attn == VARLEN, longest=bound), with_kwargs=True)
    if speed.dequantize_once:
        done["dequantized_gib"] = round(dequantize_once(base) / 2**30, 2)
    if speed.compile:
        if compile_cache is not None:
            done["compile_cache"] = use_compile_cache(compile_cache)
        # The first layer's input must require grad like every other's, or it gets a graph of its own.
        base.enable_input_require_grads()
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


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@functools.cache
def _dense_class(cls: type) -> type:
    """`cls` (peft's LoRA layer over a 4-bit weight) with the dense forward: one class for every
    such layer, so compiled code sees the same module type in every decoder layer."""
    return type(f"Dense{cls.__name__}", (cls,), {"forward": _lora_forward_dense, "prodtune_base_class": cls})


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
        layer.__class__ = _dense_class(type(layer))
        total += w.numel() * w.element_size()
    return total


def _lora_forward_dense(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's LoRA forward for a 4-bit base, with the bf16 copy of the base weight:
    y = x W^T + scale * B(A(dropout(x))); anything unusual goes to peft's own forward."""
    import torch.nn.functional as F

    if args or kwargs or self.disable_adapters or self.merged:
        return self.prodtune_base_class.forward(self, x, *args, **kwargs)
    w = self.prodtune_weight
    bias = self.get_base_layer().bias
    out = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, bias)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    for name in self.active_adapters:
        if name not in self.lora_A or name in self.lora_variant:
            if name in self.lora_A:  # DoRA and other variants: not worth a special case
                return self.prodtune_base_class.forward(self, x, *args, **kwargs)
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
    """Regional compilation: torch.compile the decoder block's call once, shared by every layer.

    All layers run one code object (Module._call_impl) with their weights as graph inputs
    (dynamo's inline_inbuilt_nn_modules), so the graph compiled for the first layer serves the
    others. Checkpointing wraps the block from outside. Without gradients (validation) the layers
    run eagerly: a few batches do not pay for a second, inference-only compile before the first
    step. `backend` is torch.compile's (tests pass a counting one). Returns the number of layers.
    """
    import torch

    # Training and validation mode entries for one code object; guards failing on some exotic
    # layer mix would otherwise fall back to eager silently.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    layers = decoder_layers(model)
    threads = torch.get_num_threads()
    for layer in layers:
        compiled = torch.compile(layer._call_impl, backend=backend)

        def call(*args: Any, _compiled: Any = compiled, _eager: Any = layer._call_impl, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _eager(*args, **kwargs)
            if torch.get_num_threads() != threads:
                # A checkpointed block runs again in autograd's own thread during the backward, and
                # that thread starts with the thread count the DataLoader's pin-memory thread set
                # (1). Dynamo guards on it: without this it compiles the block a second time.
                torch.set_num_threads(threads)
            return _compiled(*args, **kwargs)

        # What nn.Module.compile() sets; nn.Module.__call__ runs it instead of _call_impl.
        layer._compiled_call_impl = call
    return len(layers)


def use_compile_cache(folder: str | Path) -> str:
    """Keep inductor's compiled graphs and Triton kernels in `folder` (unless TORCHINDUCTOR_CACHE_DIR
    already names a place), so the next run on this machine, and every GPU process of a launch,
    loads them instead of compiling. Returns the folder in use."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(folder).expanduser()))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
