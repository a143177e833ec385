"""Stage 3 (train): LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer.

    train_stage(cfg)               format/{train,validation}.jsonl -> train/adapter, log.jsonl, loss.png, ...
    train_stage(cfg, resume=True)  continue from the last complete checkpoint in train/checkpoints

The rows are TRL's conversational prompt-completion format, so TRL renders them with the model's
own chat template (the one inference uses) and puts the loss on the completion only: the answer
and the template's end-of-turn token (`<|end|>` for Phi-3, `<|im_end|>` for SmolLM2), never the
prompt. TRL's `assistant_only_loss` is not used: it needs {% generation %} markers that SmolLM2's
template lacks.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prodtune import distributed, fast, models
from prodtune.config import Config, LoraConfig, TrainConfig, save_config
from prodtune.errors import UserError
from prodtune.io import RunPaths, atomic_dir, read_json, read_jsonl, write_json


# ----------------------------------------------------------------------------- how this run trains

@dataclass
class Plan:
    """Hardware-dependent choices, settled once from the config and the device."""

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
    speed_plan: Any = None
    """prodtune.fast.SpeedPlan: token batches, attention kernel, compile, dequantize-once."""
    batch: Any = None
    """prodtune.distributed.BatchSplit: this process's micro-batch and accumulation (global batch kept)."""
    note: str = ""
    """Advice printed at the start of training (e.g. micro-batches shrunk by the GPU count)."""

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def make_plan(train_cfg: TrainConfig, model_cfg: Any) -> Plan:
    """Settle device, precision, speed path, packing, checkpointing and, under several
    processes, each one's share of the optimizer step's batch."""
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
    # GPU speed paths (issue 6): the card's memory picks fast or small unless train.speed says.
    speed = fast.plan(train_cfg, model_cfg, _device_for_plan(device))
    # Data parallel (issue 7): N processes share one optimizer step, so the global batch, and with
    # it the result, is the one-GPU run's (token batches: train.step_tokens per step on any count).
    processes = distributed.world_size()
    note = ""
    if speed.path != "plain":
        packing, checkpointing = True, speed.checkpoint_every > 0
        batch = distributed.split_batch(speed.rows, speed.grad_accum, processes)
        if batch.per_device < speed.rows:
            # Measured on 4 x H200 (bench/NOTES.md): 16k tokens per step over 4 GPUs scale 2.87x,
            # a full micro-batch on every GPU (step_tokens=65536) 3.70x.
            note = (f"each of the {processes} GPUs gets {batch.per_device} rows of {speed.max_length} tokens per "
                    f"micro-batch instead of {speed.rows}, which leaves it partly idle; for full speed set "
                    f"train.step_tokens={speed.tokens_per_microbatch * processes} or more (more tokens per "
                    f"optimizer step: fewer steps per epoch, so revisit the learning rate)")
        speed = replace(speed, rows=batch.per_device, grad_accum=batch.accum)
    else:
        batch = distributed.split_batch(train_cfg.batch_size, train_cfg.grad_accum, processes)
    return Plan(device=device, dtype=models.compute_dtype(model_cfg, device), speed=speed.path,
                packing=packing, gradient_checkpointing=checkpointing, speed_plan=speed, batch=batch, note=note)


def _device_for_plan(device: str) -> Any:
    """The torch device this process trains on (its own GPU under accelerate launch)."""
    if device != "cuda":
        return device
    return f"cuda:{distributed.local_device_index()}"


# ----------------------------------------------------------------------------- data

def load_splits(paths: RunPaths, max_eval_samples: int | None) -> tuple[Any, Any]:
    """format/train.jsonl and format/validation.jsonl as datasets of prompt/completion rows."""
    from datasets import Dataset

    def rows(name: str) -> list[dict[str, Any]]:
        # Only the conversational columns: TRL renders them with the chat template.
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_jsonl(paths.split(name))]

    train_rows = rows("train")
    if not train_rows:
        raise UserError(f"'{paths.split('train')}' has no rows: check the clean/format reports")
    eval_rows = rows("validation") if paths.split("validation").is_file() else []
    if max_eval_samples is not None:
        eval_rows = eval_rows[:max_eval_samples]
    return Dataset.from_list(train_rows), (Dataset.from_list(eval_rows) if eval_rows else None)


# ----------------------------------------------------------------------------- trainer

def sft_config(train_cfg: TrainConfig, plan: Plan, output_dir: Path, has_eval: bool,
               eval_on_start: bool = False) -> Any:
    """TRL's SFTConfig from our TrainConfig and the hardware plan."""
    import torch
    from trl import SFTConfig

    t = train_cfg
    batch = plan.batch or distributed.split_batch(t.batch_size, t.grad_accum, 1)
    kwargs = dict(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=batch.per_device, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=batch.accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, optim=t.optim, max_grad_norm=t.max_grad_norm, seed=t.seed,
        max_length=t.max_length, packing=plan.packing,
        completion_only_loss=True,  # prompt tokens get label -100
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        # TRL defaults bf16=True; precision must follow the hardware instead.
        bf16=plan.dtype == torch.bfloat16, fp16=plan.dtype == torch.float16, use_cpu=plan.device == "cpu",
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        # eval_steps=0 means only at the end: the Trainer always evaluates after the last step.
        eval_steps=(t.eval_steps or 10**9) if has_eval else None,
        eval_on_start=eval_on_start and has_eval,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        # Padded batches carry an attention mask to count real tokens by; padding-free ones have no pads.
        include_num_input_tokens_seen="all" if plan.packing else "non_padding",
        report_to="none",  # TensorBoard is attached by hand to write into train/tensorboard
        dataloader_num_workers=0,
        **distributed.DDP_ARGS,  # under accelerate launch: DDP set up for LoRA
    )
    overrides = fast.sft_overrides(plan.speed_plan, t) if plan.speed_plan is not None else {}
    if overrides:
        # The speed paths set token batches and (per-n-layer) checkpointing themselves.
        kwargs.pop("activation_checkpointing")
        kwargs.pop("activation_checkpointing_kwargs")
        kwargs.update(overrides)
    if "activation_checkpointing" in kwargs and not hasattr(SFTConfig, "activation_checkpointing"):
        # transformers < 5.2x (Colab's, the GPU image's 5.17) only knows the older name.
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    return SFTConfig(**kwargs)


def build_trainer(model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any, lora_cfg: LoraConfig,
                  train_cfg: TrainConfig, plan: Plan, output_dir: Path, callbacks: list[Any] | None = None,
                  eval_on_start: bool = False) -> Any:
    """An SFTTrainer with LoRA on the resolved targets; tokenizes and masks the datasets."""
    import torch
    from transformers import ProgressCallback
    from trl import SFTTrainer

    targets = models.resolve_lora_targets(model, lora_cfg.target_modules)
    args = sft_config(train_cfg, plan, output_dir, eval_ds is not None, eval_on_start)
    # GPU speed (issue 6): the fast/small paths change the trainer, collator or model here.
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=models.peft_lora_config(lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, targets),
        callbacks=callbacks)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_quiet_progress())
    if plan.dtype != torch.bfloat16:
        # TRL stores a 4-bit base's LoRA weights in bf16 (the QLoRA paper's choice for bf16
        # compute). With float32 (CPU) or fp16 (T4) compute they must stay float32: bf16 updates
        # would be rounded away on the CPU, and fp16 AMP cannot unscale bf16 gradients.
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    if plan.speed_plan is not None:
        # bf16 frozen weights, FlexAttention document mask, dequantize-once, compiled layers.
        trainer.prodtune_speed = fast.prepare(trainer.model, plan.speed_plan)
    return trainer


# ----------------------------------------------------------------------------- logging

def _log_callbacks(paths: RunPaths, resume_step: int) -> list[Any]:
    """Callbacks writing train/log.jsonl (one JSON object per log event) and TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    log_path = paths.train_log
    # On resume, drop events past the checkpoint: those steps are trained again.
    kept = ([r for r in read_jsonl(log_path) if r.get("step", 0) <= resume_step]
            if resume_step and log_path.is_file() else [])
    with open(log_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    time_offset = kept[-1]["time"] if kept else 0.0

    class JsonlLog(TrainerCallback):
        """Appends step, losses, learning rate, tokens seen and elapsed seconds per log event."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs and "eval_loss" not in logs:
                return  # the end-of-training summary; train_report.json carries it
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                   "loss": logs.get("loss"), "eval_loss": logs.get("eval_loss"),
                   "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "tokens_seen": state.num_input_tokens_seen,
                   "time": round(time_offset + time.time() - self.start, 3)}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    writer = SummaryWriter(log_dir=str(paths.train / "tensorboard"))
    return [JsonlLog(), TensorBoardCallback(tb_writer=writer)]


def _quiet_progress() -> Any:
    """transformers' progress bar, showing the loss on the bar and printing only validation
    results, instead of a dict of every metric at every step."""
    from transformers import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is None or not logs:
                return
            if "eval_loss" in logs:
                self.training_bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")
            elif "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    return QuietProgress()


def last_checkpoint(paths: RunPaths) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last), or None."""
    folder = paths.checkpoints
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _peak_memory(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux: the whole process's peak, loading included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss"


# ----------------------------------------------------------------------------- stages

def train_stage(cfg: Config, resume: bool = False, *, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fine-tune LoRA adapters on format/train.jsonl; write train/adapter and the training report.

    `callbacks` are extra transformers TrainerCallbacks (notebooks, tests). Under `accelerate
    launch` (or torchrun) every process runs this function; rank 0 alone writes the run folder's
    files, and the Trainer saves checkpoints from rank 0 too. Other ranks return rank 0's report
    with an empty summary.
    """
    import torch

    started = time.time()
    paths = RunPaths(cfg.run_dir)
    main = distributed.is_main_process()
    if main:
        save_config(cfg, paths.config)
    checkpoint, resumed = None, {}
    if resume:
        # Rank 0 picks the checkpoint, so every process resumes from the same one.
        checkpoint = distributed.broadcast(last_checkpoint(paths))
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint in '{paths.checkpoints}'; "
                            "run 'prodtune train' without --resume to start from scratch")
        resumed = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    train_ds, eval_ds = load_splits(paths, cfg.train.max_eval_samples)
    plan = make_plan(cfg.train, cfg.model)
    if main and not resume and paths.checkpoints.exists():
        print(f"prodtune: starting afresh; removing old checkpoints in {paths.checkpoints}")
        shutil.rmtree(paths.checkpoints)
    paths.train.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # the old checkpoints are gone before any process goes on
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with distributed.main_process_first():  # a GGUF model is converted once, by rank 0
        model_path = models.local_model_path(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, model_path)
    model = models.load_model(cfg.model, plan.device, training=True, path=model_path,
                              gradient_checkpointing=plan.gradient_checkpointing)
    log_callbacks = _log_callbacks(paths, resumed.get("global_step", 0)) if main else []
    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, cfg.lora, cfg.train, plan, paths.checkpoints,
                            callbacks=log_callbacks + list(callbacks or []), eval_on_start=not resume)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    if main:
        processes = f"; {plan.batch.describe()}" if plan.batch.processes > 1 else ""
        print(f"prodtune: training {cfg.model.name_or_path} on {plan.device} ({plan.precision}"
              f"{', 4-bit base' if cfg.model.load_in_4bit else ''}): {len(trainer.train_dataset)} examples, "
              f"LoRA r={cfg.lora.r} on {sorted(trainer.model.peft_config['default'].target_modules)}, "
              f"{trainable:,} trainable of {total:,} parameters{processes}")
        if plan.note:
            print(f"prodtune: note: {plan.note}")

    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    peaks = distributed.gather(_peak_memory(plan.device))  # every process's GPU
    # FSDP holds every weight in shards: all processes gather the full state for rank 0 to save.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if distributed.uses_fsdp() else None
    if not main:
        distributed.barrier()  # rank 0 writes the adapter and the report
        return {**read_json(paths.train_report), "summary": ""}
    with atomic_dir(paths.adapter) as tmp:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    from prodtune.plots import plot_loss

    log_rows = read_jsonl(paths.train_log)
    plot_loss(log_rows, paths.loss_png, title=f"{Path(cfg.model.name_or_path).name}: LoRA r={cfg.lora.r}")
    report = _train_report(trainer, result.metrics.get("train_runtime", 0.0), log_rows, plan, cfg,
                           session_tokens_start=resumed.get("num_input_tokens_seen", 0), checkpoint=checkpoint,
                           peaks=peaks)
    report["wall_time_s"] = round(time.time() - started, 2)
    write_json(paths.train_report, report)
    distributed.barrier()
    losses = (f"validation loss {report['eval_loss_start']:.3f} -> {report['final_eval_loss']:.3f}"
              if report["eval_loss_start"] is not None and report["final_eval_loss"] is not None
              else f"final train loss {report['final_train_loss']}")
    report["summary"] = (
        f"trained {report['steps']} steps ({report['epochs']} epochs, {report['examples']} examples) on "
        f"{_where(plan)} in {report['train_runtime_s']:.0f} s, {report['tokens_per_s']} tokens/s; {losses}\n"
        f"adapter: {paths.adapter}\nreport: {paths.train_report}\nloss curve: {paths.loss_png}")
    return report


def _where(plan: Plan) -> str:
    """'cuda', or '4 x cuda' for four data-parallel processes."""
    processes = plan.batch.processes if plan.batch is not None else 1
    return f"{processes} x {plan.device}" if processes > 1 else plan.device


def _train_report(trainer: Any, runtime: float, log_rows: list[dict[str, Any]], plan: Plan, cfg: Config,
                  session_tokens_start: int, checkpoint: Path | None,
                  peaks: list[tuple[float, str]]) -> dict[str, Any]:
    """train_report.json: what was trained, how fast, how much memory (the largest of the
    processes'), and the losses. Token counts and tokens/s are over all processes."""
    import torch

    state = trainer.state
    trainable, total = trainer.model.get_nb_trainable_parameters()
    train_losses = [r["loss"] for r in log_rows if r.get("loss") is not None]
    eval_losses = [(r["step"], r["eval_loss"]) for r in log_rows if r.get("eval_loss") is not None]
    session_tokens = state.num_input_tokens_seen - session_tokens_start
    peak, peak_kind = max(p for p, _ in peaks), peaks[0][1]
    batch = plan.batch
    return {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "examples": len(trainer.train_dataset),
        "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "tokens_seen": state.num_input_tokens_seen,  # prompt + completion, padding excluded
        "tokens_per_s": round(session_tokens / runtime, 1) if runtime else None,  # validation time included
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": peak_kind,
        "peak_memory_gib_per_process": [round(p, 3) for p, _ in peaks],
        "processes": batch.processes,
        "per_device_batch": batch.per_device,  # examples, or packed rows on the speed paths
        "grad_accum": batch.accum,
        "global_batch": batch.global_batch,
        "global_batch_kept": batch.kept,
        "train_runtime_s": round(runtime, 2),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_start": eval_losses[0][1] if eval_losses and eval_losses[0][0] == 0 else None,
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "device": plan.device,
        "gpu": torch.cuda.get_device_name() if plan.device == "cuda" else None,
        "precision": plan.precision,
        "load_in_4bit": cfg.model.load_in_4bit,
        "speed": plan.speed,
        "speed_plan": plan.speed_plan.describe() if plan.speed_plan is not None else None,
        "speed_prepared": getattr(trainer, "prodtune_speed", None),
        "packing": plan.packing,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "trainable_params": trainable,
        "total_params": total,
        "lora_targets": sorted(trainer.model.peft_config["default"].target_modules),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "adapter": str(RunPaths(cfg.run_dir).adapter),
    }
