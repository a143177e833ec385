"""Several training processes (`accelerate launch` / `torchrun`): who writes, which GPU, when to wait.

    accelerate launch -m prodtune train --config configs/phi3-qlora.yaml          # every visible GPU
    accelerate launch --num_processes 2 -m prodtune train --config ... --resume

Thin wrappers over accelerate's PartialState, the object transformers' Trainer itself uses for
the same questions, so prodtune and the Trainer agree on ranks and devices. In a plain single
process every helper is a no-op: is_main_process() is True, world_size() is 1, barrier() returns.

The data-parallel training itself (DDP, gradient all-reduce, sharded data loading, rank-0
checkpoints) is the Trainer's; prodtune only keeps the global batch, puts each rank's 4-bit base on
its own GPU and lets rank 0 alone write the run folder's files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


DDP_ARGS: dict[str, Any] = {"ddp_find_unused_parameters": False, "ddp_broadcast_buffers": False}
"""TrainingArguments for DDP over a LoRA model: every LoRA weight gets a gradient in every step, so
DDP need not search the graph for unused ones (the Trainer would, for a PeftModel); the buffers
are constants (RoPE tables, the fast path's bf16 copy of the base), so they are not re-sent from
rank 0 before every forward. No effect in a single process."""


def state() -> Any:
    """accelerate's PartialState for this process (initialises the process group when launched).

    On a machine without CUDA (or with ACCELERATE_USE_CPU=1) it is asked for the CPU, so that
    torchrun's processes join one gloo group instead of each training alone.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Not cached: TrainingArguments resets the shared state and builds its own from the same env.
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def launched_processes() -> int:
    """How many processes accelerate launch / torchrun started (WORLD_SIZE; 1 when run plainly).
    Read from the environment: no process group is set up."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched() -> bool:
    """True when a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return launched_processes() > 1


def world_size() -> int:
    """Number of training processes (1 without a launcher)."""
    return state().num_processes if launched() else 1


def process_index() -> int:
    """This process's rank (0 without a launcher)."""
    return state().process_index if launched() else 0


def is_main_process() -> bool:
    """True on rank 0, the only process that writes the run folder's files."""
    return process_index() == 0


def local_device_index() -> int:
    """The CUDA device index this process trains on: its local rank's GPU under a launcher
    (accelerate sets it as the current device), else the current device."""
    import torch

    if launched():
        device = state().device
        if device.type == "cuda":
            return device.index or 0
    return torch.cuda.current_device()


def uses_fsdp() -> bool:
    """True when `accelerate launch` was given an FSDP config (configs/accelerate/fsdp-qlora.yaml)."""
    return launched() and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def barrier() -> None:
    """Wait until every process gets here."""
    if launched():
        state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. converting a model into a shared cache); the others
    run it after, when they find the result ready."""
    if not launched():
        yield
        return
    with state().main_process_first():
        yield


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every process (picklable objects)."""
    if not launched():
        return value
    from accelerate.utils import broadcast_object_list

    state()  # the collective below needs the process group
    return broadcast_object_list([value], from_process=0)[0]


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order, on every process (picklable objects)."""
    if not launched():
        return [value]
    from accelerate.utils import gather_object

    state()
    return gather_object([value])


# ----------------------------------------------------------------------------- the global batch

@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's micro-batches are shared between the processes."""

    per_device: int
    """Examples (or packed rows) per process per micro-batch."""
    accum: int
    """Micro-batches each process accumulates per optimizer step."""
    processes: int
    """Number of processes."""
    wanted: int
    """Examples (rows) per optimizer step that one process would take: per_device x accum as configured."""

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accum * self.processes

    @property
    def kept(self) -> bool:
        return self.global_batch == self.wanted

    def describe(self) -> str:
        text = (f"{self.processes} processes x {self.per_device} per device x {self.accum} accumulation "
                f"= {self.global_batch} per optimizer step")
        if not self.kept:
            text += (f" (configured: {self.wanted}, not divisible by {self.processes} processes; "
                     f"choose a process count that divides {self.wanted} to keep one-GPU results)")
        return text


def split_batch(per_device: int, accum: int, processes: int) -> BatchSplit:
    """Share per_device x accum examples per optimizer step between `processes` so that the global
    batch, and with it the optimisation, stays what one process would do.

    The accumulation is divided first (per-device micro-batches keep their size, which is what
    keeps a GPU busy); when it runs out, the micro-batch is split too. accelerate deals the
    micro-batches of the one shuffled order to the processes in turn, so the examples of a step
    are the same ones a single process would take. When the total is not
    divisible by `processes`, each process takes round(total / processes) (at least 1) and the
    global batch changes: `BatchSplit.kept` is False and `describe()` says so.
    """
    per_device, accum, processes = max(1, per_device), max(1, accum), max(1, processes)
    total = per_device * accum
    if processes == 1:
        return BatchSplit(per_device, accum, 1, total)
    share = max(1, round(total / processes))
    # The largest micro-batch that divides this process's share, up to the configured one.
    size = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
    return BatchSplit(size, share // size, processes, total)
