"""How a run trains on this machine: device, precision, speed path, packing and the optimizer step.

    plan = make_plan(cfg.train, cfg.model, mean_example_tokens(train_ds, tokenizer, cfg.train.max_length))
    plan.describe_step()   # '16,384 tokens = ~68.3 examples per optimizer step (8 rows of 2048 tokens x 1 ...)'

Settled once, before the model loads, from the config, the card and the training data, so that
the train stage, the benchmark and the tests all train the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prodtune import distributed, fast, models
from prodtune.config import TrainConfig
from prodtune.errors import UserError
from prodtune.prompts import tokenize_as_trl


@dataclass
class Plan:
    """Hardware-dependent choices, settled once from the config, the device and the data."""

    device: str
    """'cuda' or 'cpu'."""
    dtype: Any
    """Compute dtype (torch.bfloat16 / float16 / float32)."""
    speed: str
    """Training path: 'plain' (TRL as is), 'fast' or 'small' (GPU speed paths, prodtune.fast)."""
    packing: bool
    """Padding-free packing of examples into max_length rows."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass."""
    speed_plan: fast.SpeedPlan
    """Token batches, attention kernel, compile, dequantize-once (path 'plain': TRL as is)."""
    batch: distributed.BatchSplit
    """One optimizer step: rows (packed) or examples per micro-batch, accumulation and processes."""
    note: str = ""
    """Advice printed at the start of training (e.g. micro-batches shrunk by the GPU count)."""
    max_length: int = 2048
    """Tokens per packed row (train.max_length)."""
    example_tokens: float | None = None
    """Mean tokens of one training example (prompt + completion), measured on the training split."""
    compile_cache: str | None = None
    """Where compiled kernels are kept between runs (the speed paths that compile)."""

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def step_tokens(self) -> int:
        """Tokens of one optimizer step: exact when packed (whole rows; the last row of a batch
        is topped up with padding), the examples' mean length times their count otherwise."""
        if self.packing:
            return self.batch.global_batch * self.max_length
        return round(self.batch.global_batch * (self.example_tokens or 0))

    @property
    def step_examples(self) -> float | None:
        """Examples of one optimizer step: exact when not packed, on average when packed."""
        if not self.packing:
            return float(self.batch.global_batch)
        return self.step_tokens / self.example_tokens if self.example_tokens else None

    def steps_per_epoch(self, items: int) -> int:
        """Optimizer steps in one pass over `items` training rows (packed) or examples, counted
        as the Trainer counts them."""
        b = self.batch
        micro_batches = math.ceil(items / (b.per_device * b.processes))
        return max(1, math.ceil(micro_batches / b.accum))

    def describe_step(self) -> str:
        """The optimizer step in tokens and examples, and how it is split."""
        b = self.batch
        gpus = f" x {b.processes} processes" if b.processes > 1 else ""
        examples = f"{self.step_examples:,.1f}" if self.step_examples is not None else "?"
        if self.packing:
            return (f"{self.step_tokens:,} tokens = ~{examples} examples per optimizer step ({b.per_device} rows of "
                    f"{self.max_length} tokens x {b.accum} accumulation{gpus})")
        return (f"~{self.step_tokens:,} tokens = {examples} examples of ~{self.example_tokens:.0f} tokens per optimizer "
                f"step ({b.per_device} examples x {b.accum} accumulation{gpus})")


def make_plan(train_cfg: TrainConfig, model_cfg: Any, example_tokens: float | None = None) -> Plan:
    """Settle device, precision, speed path, packing, checkpointing and the optimizer step.

    The step is train.step_tokens tokens on every path and any number of processes. Packed paths
    take whole rows of max_length tokens: step_tokens / max_length rows per step. Unpacked ones
    (train.packing=false, or a CPU) take step_tokens / `example_tokens` examples (the mean length of
    this run's examples), train.batch_size of them per micro-batch. Under several processes the
    step is shared, accumulation first (prodtune.distributed.split_batch).
    """
    device = models.pick_device(train_cfg.device)
    on_gpu = device == "cuda"
    packing = on_gpu if train_cfg.packing == "auto" else bool(train_cfg.packing)
    checkpointing = on_gpu if train_cfg.gradient_checkpointing == "auto" else bool(train_cfg.gradient_checkpointing)
    if on_gpu and distributed.uses_fsdp() and train_cfg.speed in ("auto", "fast"):
        # The fast path keeps a bf16 copy of the whole base on every GPU: what FSDP is there to avoid.
        if train_cfg.speed == "fast":
            raise UserError("train.speed=fast keeps a full bf16 copy of the base on every GPU and cannot "
                            "run under FSDP; use train.speed=auto (small) or plain")
        train_cfg = replace(train_cfg, speed="small")
    # GPU speed paths: the card's memory picks fast or small unless train.speed says.
    # Under FSDP (flat parameters: fsdp_use_orig_params false, peft's QLoRA recipe) the layers run eagerly.
    speed = fast.plan(train_cfg, model_cfg, _device_for_plan(device), sharded=distributed.uses_fsdp())
    processes = distributed.world_size()
    if speed.path != "plain":
        packing, checkpointing = True, speed.checkpoint_every > 0
        rows, accum = speed.rows, speed.grad_accum
    elif packing:
        # train.batch_size counts packed rows here (TRL's meaning): a memory knob, not the step.
        rows, accum = fast.step_split(train_cfg.batch_size, train_cfg.max_length, train_cfg.step_tokens)
    else:
        if not example_tokens:
            raise ValueError("make_plan needs the mean example length (example_tokens) for unpacked batches")
        examples = max(1, round(train_cfg.step_tokens / example_tokens))
        rows = min(train_cfg.batch_size, examples)
        accum = max(1, round(examples / rows))
    batch = distributed.split_batch(rows, accum, processes)
    note = ""
    if packing and batch.per_device < rows:
        # Measured on 4 x H200 (bench/NOTES.md): 16k tokens per step over 4 GPUs scale 2.87x,
        # a full micro-batch on every GPU (step_tokens=65536) 3.70x.
        note = (f"each of the {processes} GPUs gets {batch.per_device} rows of {train_cfg.max_length} tokens per "
                f"micro-batch instead of {rows}, which leaves it partly idle; for full speed set "
                f"train.step_tokens={rows * train_cfg.max_length * processes} or more (more tokens per "
                f"optimizer step: fewer steps per epoch, so revisit the learning rate)")
    if speed.path != "plain":
        speed = replace(speed, rows=batch.per_device, grad_accum=batch.accum)
    plan = Plan(device=device, dtype=models.compute_dtype(model_cfg, device), speed=speed.path,
                packing=packing, gradient_checkpointing=checkpointing, speed_plan=speed, batch=batch, note=note,
                max_length=train_cfg.max_length, example_tokens=example_tokens,
                compile_cache=str(Path(model_cfg.cache_dir).expanduser() / "compile"))
    if packing and plan.step_tokens != train_cfg.step_tokens:
        rounded = (f"train.step_tokens={train_cfg.step_tokens} is not a whole number of {train_cfg.max_length}-token "
                   f"rows{f' for {processes} processes' if processes > 1 else ''}: each step takes "
                   f"{plan.step_tokens:,} tokens")
        plan.note = f"{rounded}; {note}" if note else rounded
    return plan


def _device_for_plan(device: str) -> Any:
    """The torch device this process trains on (its own GPU under accelerate launch)."""
    if device != "cuda":
        return device
    return f"cuda:{distributed.local_device_index()}"


def mean_example_tokens(dataset: Any, tokenizer: Any, max_length: int, sample: int = 1000) -> float:
    """Mean tokens of one example (prompt + completion as the chat template renders them, at most
    max_length), over an evenly spread sample of at most `sample` rows: what turns train.step_tokens
    into examples per step."""
    n = len(dataset)
    rows = dataset.select(range(0, n, max(1, n // sample)))
    if "input_ids" in rows.column_names:  # already tokenized
        lengths = [len(ids) for ids in rows["input_ids"]]
    else:
        lengths = [len(ids) for ids, _ in tokenize_as_trl(tokenizer, rows["prompt"], rows["completion"], max_length)]
    return sum(min(x, max_length) for x in lengths) / max(1, len(lengths))
