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

import dataclasses
import importlib.util
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from prodtune import distributed, fast, models
from prodtune.config import Config, LoraConfig, TrainConfig, section_hash
from prodtune.plan import Plan, make_plan, mean_example_tokens
from prodtune.plots import plot_loss
from prodtune.errors import UserError
from prodtune.io import RunPaths, atomic_dir, read_json, read_jsonl, write_json


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
    batch = plan.batch
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
        # Real tokens: padded batches by their attention mask, padding-free ones by the pad id.
        include_num_input_tokens_seen="non_padding",
        # TensorBoard is attached by hand (to write into train/tensorboard); the others go to TRL.
        report_to=report_targets(t.report_to)[1] or "none",
        run_name=Path(output_dir).parent.parent.name,  # the run folder's name, for W&B and MLflow
        dataloader_num_workers=0,
        **distributed.DDP_ARGS,  # under accelerate launch: DDP set up for LoRA
    )
    overrides = fast.sft_overrides(plan.speed_plan)
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

    targets = models.resolve_lora_targets(model, lora_cfg.target_modules)
    args = sft_config(train_cfg, plan, output_dir, eval_ds is not None, eval_on_start)
    trainer = fast.trainer_class(plan.speed_plan)(
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
    # The speed paths: bf16 frozen weights, varlen attention, dequantize-once, the compiled decoder block.
    trainer.prodtune_speed = fast.prepare_trainer(trainer, plan.speed_plan, plan.compile_cache)
    return trainer


WARMUP_STEPS = 2
"""Optimizer steps left out of the steady tokens/s: compilation and first-use allocations."""


def step_clock(started: float, cuda: bool) -> Any:
    """A TrainerCallback timing each optimizer step, validation, logging and checkpoints left out.

    `first_step_s` counts from `started` (the stage's start; the model load in the bench) to the
    end of the first optimizer step: loading, compiling and warming up included. `summary()` gives
    it with the steady tokens/s over the steps after the first WARMUP_STEPS. On a GPU the steps are
    timed by CUDA events on the GPU's own timeline: waiting for the GPU at each step's end would
    itself leave it idle while the next step is set up.
    """
    from transformers import TrainerCallback

    if cuda:
        import torch

    def stamp() -> Any:
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.first_step_s: float | None = None
            self._done: list[tuple[float, int]] = []  # (seconds, tokens) per optimizer step
            self._pending: list[tuple[Any, Any, int]] = []  # (start, end, tokens): events not yet read
            self._mark, self._tokens = stamp(), 0

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark, self._tokens = stamp(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            end = stamp()
            if self.first_step_s is None:
                if cuda:
                    end.synchronize()
                self.first_step_s = time.perf_counter() - started
            self._pending.append((self._mark, end, state.num_input_tokens_seen - self._tokens))
            self._mark, self._tokens = end, state.num_input_tokens_seen
            self._read(wait=False)

        def _pause(self, args, state, control, **kwargs):  # not training: the next step starts here
            self._mark = stamp()

        on_evaluate = on_log = on_save = _pause

        def _read(self, wait: bool) -> None:
            """Turn the steps whose end the GPU has passed (all of them with `wait`) into seconds."""
            while self._pending:
                start, end, tokens = self._pending[0]
                if cuda and not wait and not end.query():
                    return
                if cuda:
                    end.synchronize()
                self._done.append((start.elapsed_time(end) / 1000 if cuda else end - start, tokens))
                self._pending.pop(0)

        @property
        def steps(self) -> list[tuple[float, int]]:
            """(seconds, tokens) of each optimizer step so far."""
            self._read(wait=True)
            return list(self._done)

        def summary(self) -> dict[str, Any]:
            """first_step_s, the steady tokens/s and step time, and how many steps they cover."""
            steps = self.steps
            skip = WARMUP_STEPS if len(steps) > WARMUP_STEPS else max(0, len(steps) - 1)
            timed = steps[skip:] if len(steps) > 1 else []
            seconds, tokens = sum(s for s, _ in timed), sum(t for _, t in timed)
            return {"first_step_s": round(self.first_step_s, 2) if self.first_step_s is not None else None,
                    "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                    "step_s": round(seconds / len(timed), 4) if timed else None,
                    "steady_steps": len(timed), "warmup_steps_left_out": len(steps) - len(timed)}

    return StepClock()


# ----------------------------------------------------------------------------- logging

REPORTERS = {"wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "neptune": "neptune",
             "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio", "swanlab": "swanlab",
             "azure_ml": "azureml", "codecarbon": "codecarbon", "dagshub": "dagshub", "flyte": "flytekit"}
"""transformers' logging integrations (besides tensorboard) -> the package each needs."""


def report_targets(report_to: str | list[str]) -> tuple[bool, list[str]]:
    """(log to TensorBoard?, the other integrations for the Trainer) from train.report_to.

    An unknown name or an integration whose package is missing is a UserError, before any
    model is loaded.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if names in ([], ["none"]):
        return False, []
    known = ["tensorboard", *REPORTERS]
    wrong = [n for n in names if n not in known]
    if wrong:
        hint = "; 'none' cannot be combined with others" if "none" in wrong else ""
        raise UserError(f"train.report_to: {wrong[0]!r} is not one of none, {', '.join(known)}{hint}")
    for name in names:
        if name != "tensorboard" and importlib.util.find_spec(REPORTERS[name]) is None:
            raise UserError(f"train.report_to={name}: the {REPORTERS[name]} package is not installed; "
                            f"pip install {REPORTERS[name]}, or leave {name} out of train.report_to")
    return "tensorboard" in names, [n for n in names if n != "tensorboard"]


def _log_callbacks(paths: RunPaths, resume_step: int, tensorboard: bool = True) -> list[Any]:
    """Callbacks writing train/log.jsonl (one JSON object per log event) and, by default, TensorBoard.

    Called once training is about to start: it rewrites the log (on resume, without the events
    past the checkpoint, whose steps are trained again) and opens the TensorBoard writer.
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    log_path = paths.train_log
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

    if not tensorboard:
        return [JsonlLog()]
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

def trained_with(cfg: Config) -> list[Any]:
    """The settings a trained adapter depends on: model, LoRA and training, but not where the
    training logs go (train.report_to), which changes nothing the run produces."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k != "report_to"}
    return [cfg.model, cfg.lora, train]


def _check_resume(paths: RunPaths, tag: dict[str, str]) -> Path:
    """The checkpoint to resume from; a UserError when there is none or it was trained on other data."""
    checkpoint = distributed.broadcast(last_checkpoint(paths))  # rank 0 picks: every process resumes alike
    if checkpoint is None:
        raise UserError(f"--resume: no complete checkpoint in '{paths.checkpoints}'; "
                        "run 'prodtune train' without --resume to start from scratch")
    made = read_json(paths.checkpoints_tag) if paths.checkpoints_tag.is_file() else {}
    if made.get("format_digest") not in (None, tag["format_digest"]):
        raise UserError(f"--resume: the checkpoints in '{paths.checkpoints}' were trained on other splits "
                        f"(format outputs {made['format_digest']}, now {tag['format_digest']}: format ran again "
                        "since); run 'prodtune train' without --resume to train on the current splits")
    if made.get("config_hash") not in (None, tag["config_hash"]):
        print("prodtune: note: resuming with model/lora/train settings that differ from the checkpoints'")
    return checkpoint


def train_stage(cfg: Config, resume: bool = False, *, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fine-tune LoRA adapters on format/train.jsonl; write train/adapter and the training report.

    Everything that can be checked (the splits, the plan, the tokenizer and model loading, the
    trainer's settings) is checked before the previous run's checkpoints are removed; a failure
    before then leaves the run folder as it was. `callbacks` are extra transformers
    TrainerCallbacks (notebooks, tests). Under `accelerate launch` (or torchrun) every process runs
    this function; rank 0 alone writes the run folder's files. Other ranks return rank 0's report
    with an empty summary.
    """
    import torch

    started, clock_start = time.time(), time.perf_counter()
    paths = RunPaths(cfg.run_dir)
    main = distributed.is_main_process()
    tensorboard, loggers = report_targets(cfg.train.report_to)
    train_ds, eval_ds = load_splits(paths, cfg.train.max_eval_samples)
    tag = {"config_hash": section_hash(*trained_with(cfg)), "format_digest": paths.format_digest()}
    checkpoint = _check_resume(paths, tag) if resume else None
    resumed = read_json(checkpoint / "trainer_state.json") if checkpoint else {}
    with distributed.main_process_first():  # a GGUF model is converted once, by rank 0
        model_path = models.local_model_path(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, model_path)
    plan = make_plan(cfg.train, cfg.model, mean_example_tokens(train_ds, tokenizer, cfg.train.max_length))
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    load_start = time.perf_counter()
    model = models.load_model(cfg.model, plan.device, training=True, path=model_path,
                              gradient_checkpointing=plan.gradient_checkpointing)
    model_load_s = time.perf_counter() - load_start
    clock = step_clock(clock_start, plan.device == "cuda")
    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, cfg.lora, cfg.train, plan, paths.checkpoints,
                            callbacks=[clock] + list(callbacks or []), eval_on_start=not resume)
    # Everything checkable has been checked: from here on the previous run's checkpoints go.
    if main:
        _replace_previous_run(paths, trainer, tag if not resume else None, resumed.get("global_step", 0),
                              tensorboard)
    distributed.barrier()  # the old checkpoints are gone before any process goes on
    if main:
        _print_start(cfg, plan, trainer, len(train_ds))

    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if "wandb" in loggers and main:
        # transformers leaves the W&B run open, and the next train_stage in a notebook would log into it.
        import wandb

        wandb.finish()
    if trainer.state.global_step <= resumed.get("global_step", 0):
        raise UserError(f"training ran no optimizer step (train.epochs={cfg.train.epochs}, train.max_steps="
                        f"{cfg.train.max_steps}, {len(trainer.train_dataset)} examples); the adapter in "
                        f"'{paths.adapter}' was left as it was")
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
    log_rows = read_jsonl(paths.train_log)
    plot_loss(log_rows, paths.loss_png, title=f"{Path(cfg.model.name_or_path).name}: LoRA r={cfg.lora.r}")
    report = _train_report(trainer, result.metrics.get("train_runtime", 0.0), log_rows, plan, cfg,
                           session_tokens_start=resumed.get("num_input_tokens_seen", 0), checkpoint=checkpoint,
                           peaks=peaks, examples=len(train_ds),
                           timing={**clock.summary(), "model_load_s": round(model_load_s, 2)})
    report["trained_on"] = tag  # compare checks that the splits are still these
    report["wall_time_s"] = round(time.time() - started, 2)
    write_json(paths.train_report, report)
    distributed.barrier()
    report["summary"] = _summary(report, plan, paths)
    return report


def _replace_previous_run(paths: RunPaths, trainer: Any, tag: dict[str, str] | None, resume_step: int,
                          tensorboard: bool) -> None:
    """Rank 0, once everything is checked: a fresh run (tag given) removes the previous run's
    checkpoints, saying so, and tags the new ones; the logs start (or continue past resume_step)."""
    if tag is not None:
        if paths.checkpoints.exists():
            print(f"prodtune: starting afresh; removing the previous run's checkpoints in {paths.checkpoints}")
            shutil.rmtree(paths.checkpoints)
        write_json(paths.checkpoints_tag, tag)
    for callback in _log_callbacks(paths, resume_step, tensorboard):
        trainer.add_callback(callback)


def _print_start(cfg: Config, plan: Plan, trainer: Any, examples: int) -> None:
    """What is trained, where, on which path, and the optimizer step in tokens and examples."""
    trainable, total = trainer.model.get_nb_trainable_parameters()
    steps_per_epoch = plan.steps_per_epoch(len(trainer.train_dataset))  # packed rows, or examples
    print(f"prodtune: training {cfg.model.name_or_path} on {_where(plan)} ({plan.precision}"
          f"{', 4-bit base' if cfg.model.load_in_4bit else ''}): {examples:,} examples, "
          f"LoRA r={cfg.lora.r} on {sorted(trainer.model.peft_config['default'].target_modules)}, "
          f"{trainable:,} trainable of {total:,} parameters")
    print(f"prodtune: path {plan.speed_plan.describe()}")
    print(f"prodtune: step {plan.describe_step()}; {steps_per_epoch:,} optimizer steps per epoch")
    if plan.note:
        print(f"prodtune: note: {plan.note}")


def _summary(report: dict[str, Any], plan: Plan, paths: RunPaths) -> str:
    losses = (f"validation loss {report['eval_loss_start']:.3f} -> {report['final_eval_loss']:.3f}"
              if report["eval_loss_start"] is not None and report["final_eval_loss"] is not None
              else f"final train loss {report['final_train_loss']}")
    return (f"trained {report['steps']} steps ({report['epochs']} epochs, {report['examples']} examples) on "
            f"{_where(plan)} in {report['train_runtime_s']:.0f} s, {report['tokens_per_s']} tokens/s after warm-up "
            f"(first step done after {report['first_step_s']} s); {losses}\n"
            f"adapter: {paths.adapter}\nreport: {paths.train_report}\nloss curve: {paths.loss_png}")


def check_trained_on(paths: RunPaths) -> None:
    """Refuse an adapter trained on other splits than format/ holds now: its test split could hold
    titles the adapter was trained on, the leak the held-out comparison exists to prevent."""
    report = read_json(paths.train_report) if paths.train_report.is_file() else {}
    trained = (report.get("trained_on") or {}).get("format_digest")
    if trained is None:
        return  # an adapter from elsewhere (or an older run): nothing recorded to check against
    now = paths.format_digest()
    if trained != now:
        raise UserError(f"the adapter in '{paths.adapter}' was trained on other splits than format/ holds now "
                        f"(trained on format outputs {trained}, now {now}: format ran again since, e.g. with "
                        "another data.seed); its test items may be ones it trained on. Re-train on the "
                        "current splits ('prodtune train'), or run 'prodtune run', which redoes what changed")


def _where(plan: Plan) -> str:
    """'cuda', or '4 x cuda' for four data-parallel processes."""
    processes = plan.batch.processes if plan.batch is not None else 1
    return f"{processes} x {plan.device}" if processes > 1 else plan.device


def _train_report(trainer: Any, runtime: float, log_rows: list[dict[str, Any]], plan: Plan, cfg: Config,
                  session_tokens_start: int, checkpoint: Path | None, peaks: list[tuple[float, str]],
                  examples: int, timing: dict[str, Any]) -> dict[str, Any]:
    """train_report.json: what was trained, the optimizer step, how fast, how much memory (the
    largest of the processes'), and the losses. Token counts and tokens/s are over all processes;
    tokens_per_s leaves out the warm-up steps (compilation) and validation, tokens_per_s_overall
    is the whole session's."""
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
        "examples": examples,
        "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "tokens_seen": state.num_input_tokens_seen,  # prompt + completion, padding excluded
        "tokens_per_s": timing["tokens_per_s"],
        "tokens_per_s_overall": round(session_tokens / runtime, 1) if runtime else None,  # compile, validation too
        "first_step_s": timing["first_step_s"],  # stage start (data, model load, compile) to first step done
        "model_load_s": timing["model_load_s"],
        "steady_step_s": timing["step_s"],
        "warmup_steps_left_out": timing["warmup_steps_left_out"],
        "step": {"tokens": plan.step_tokens, "examples": round(plan.step_examples or 0, 2),
                 "configured_step_tokens": cfg.train.step_tokens, "unit": "rows" if plan.packing else "examples",
                 "per_device": batch.per_device, "grad_accum": batch.accum, "processes": batch.processes,
                 "optimizer_steps_per_epoch": plan.steps_per_epoch(len(trainer.train_dataset)),
                 "example_tokens_mean": round(plan.example_tokens or 0, 1)},
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": peak_kind,
        "peak_memory_gib_per_process": [round(p, 3) for p, _ in peaks],
        "processes": batch.processes,
        "per_device_batch": batch.per_device,  # examples, or packed rows when packing
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
        "speed_plan": plan.speed_plan.describe(),
        "speed_prepared": getattr(trainer, "prodtune_speed", None),
        "packing": plan.packing,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "trainable_params": trainable,
        "total_params": total,
        "lora_targets": sorted(trainer.model.peft_config["default"].target_modules),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "adapter": str(RunPaths(cfg.run_dir).adapter),
    }
