"""Training throughput and time to first step of prodtune's GPU paths, the plain recipe and Unsloth.

    python bench/bench_train.py                       # default configs, Llama-shaped Phi-3-mini, on the GPU
    python bench/bench_train.py --tiny                # tiny model on the CPU: checks the script runs
    python bench/bench_train.py --configs reference,fast --steps 8 --out /tmp/results
    python bench/bench_train.py --configs unsloth-packed --unsloth-site /tmp/site-unsloth
    python bench/bench_train.py --gpus 1,2,4          # data-parallel scaling of the fast path
    python bench/bench_train.py --tiny --gpus 1,2     # the same on the CPU, 2 gloo processes: a check

Every prodtune configuration runs the train stage's own code: `plan.make_plan` settles the plan
from a TrainConfig (train.step_tokens and all), `models.load_model` loads the base as `prodtune
train` does, `train.build_trainer` builds the SFTTrainer (SFTConfig, LoRA, fast.prepare) and
`train.step_clock` times it. Variants that no config key reaches (checkpointing every k-th layer,
FlexAttention, eager layers) replace fields of the returned SpeedPlan and say so in their name.
Unsloth configurations load the same model folder with Unsloth's FastLanguageModel and train the
same data with its SFTTrainer (bench_unsloth.py), in their own process and Python path.

Each configuration runs in its own process, with its own empty compile cache (TORCHINDUCTOR_CACHE_DIR)
unless --warm-cache: `first_step_s` (model load -> first optimizer step done; the probe below left
out) is a cold start. Same random model (saved once, bf16 safetensors, loaded 4-bit), same synthetic
pre-tokenized prompt/completion examples (AmazonTitles-like: ~240 tokens, loss on the completion
only). The model is Llama-shaped with Phi-3-mini's sizes (--shape llama, the default: Unsloth turns
Phi-3 into this shape itself, so every row trains the same modules), or Phi-3 (--shape phi3:
prodtune's users' model, q/k/v fused) or Phi-3-medium (--shape phi3-medium, 14B, for FSDP).

Printed per configuration: non-padding tokens/s over the timed steps, mean step time, first_step_s,
peak GPU memory, MFU = tokens/s x F x N / 790 TFLOP/s (F = 4 + 2 x share of checkpointed layers),
a probe loss (every configuration's loss on the same 8 examples before training, no gradients) and
the loss after the same samples (configurations with the same tokens per step train the same rows
in the same order). Results: <out>/train-<card>.json (default bench/results/).

Scaling (--gpus 1,2,4; bench/run_scaling.sh): one configuration launched with `accelerate launch
--num_processes N` on the first N GPUs, N from the list, at the same train.step_tokens (the step is
shared by the GPUs, so the loss after the same steps is comparable); --per-gpu-batch keeps each
GPU's one-GPU micro-batch instead. --accelerate-config FILE launches with that accelerate config
(configs/accelerate/fsdp-qlora.yaml). Results: <out>/scaling-<card>-x<N>.json, logs in
<out>/log-scaling.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_STEP = 16384  # train.step_tokens' default: results at other step sizes are named and grouped apart
PEAK_FLOPS = 790e12  # bf16 dense matmul measured on this workplace's H100 and H200 (KINDS.md)
PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064)
SHAPES = {  # Phi-3-mini-4k's and Phi-3-medium-4k's sizes (llama: Phi-3-mini's in Llama's layout); N counted from them
    "llama": PHI3_MINI,
    "phi3": PHI3_MINI,
    "phi3-medium": dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=10, vocab_size=32064),
}

# name -> what it runs. train: TrainConfig overrides (the user's knobs); plan: SpeedPlan fields
# replaced after plan.make_plan (variants no config key reaches); cap_gib: a smaller card
# (torch.cuda.set_per_process_memory_fraction, and the plan picked for that card); t4: the plan a
# T4 gets (no bf16, no flash attention: fp16 compute, SDPA); unsloth: Unsloth's settings instead.
CONFIGS: dict[str, dict[str, Any]] = {
    # The original recipe: 8 examples (2 x 4) per step, padded, 4-bit on the fly, checkpointing, TRL as is.
    "reference": {"train": {"speed": "plain", "packing": False, "step_tokens": 2048, "batch_size": 2,
                            "gradient_checkpointing": True}},
    # TRL as is at prodtune's step (16k tokens: 2 packed rows x 4): the loss baseline for the speed paths.
    "plain": {"train": {"speed": "plain", "batch_size": 2, "gradient_checkpointing": True}},
    "fast": {"train": {"speed": "auto"}},  # the default for the card (H200: no checkpointing)
    "fast-recipe": {"train": {"speed": "auto", "step_tokens": 2048}},  # the original recipe's step, fast path
    "fast-ckpt2": {"train": {"speed": "fast"}, "plan": {"checkpoint_every": 2}},  # the default of 80 GB cards
    "fast-ckpt": {"train": {"speed": "fast"}, "plan": {"checkpoint_every": 1}},
    "fast-eager": {"train": {"speed": "fast"}, "plan": {"compile": False}},
    "fast-flex": {"train": {"speed": "fast"}, "plan": {"attn_implementation": "flex_attention"}},
    "small": {"train": {"speed": "small"}},
    "small-eager": {"train": {"speed": "small"}, "plan": {"compile": False}},
    "small-8k": {"train": {"speed": "small"}, "plan": {"offload": False}},  # the default without offloading
    "small-4k": {"train": {"speed": "small"}, "plan": {"rows": 2, "grad_accum": 4, "offload": False}},
    "fast-adamw": {"train": {"speed": "auto", "optim": "adamw_torch_fused"}},  # 32-bit fused AdamW, one kernel
    # The fast path as it was before the step stopped waiting for the GPU: TRL's own trainer (its
    # .item()s), attention sized to the 2048-token row, each padding token its own example.
    "fast-before": {"train": {"speed": "auto"}, "before": True},
    "fast-log10": {"train": {"speed": "auto", "logging_steps": 10}},  # a log (a read of the GPU) every 10 steps
    # The fast path with TRL's LM head as is: labelled positions found by a boolean mask on the GPU.
    "fast-maskhead": {"train": {"speed": "auto"}, "mask_head": True},
    # The fast path with flash attention sized to the data's longest example, not each batch's.
    "fast-databound": {"train": {"speed": "auto"}, "data_bound": True},
    # Round 4's fast path: both of the above, and each log written (and read back) at its step.
    "fast-r4": {"train": {"speed": "auto"}, "mask_head": True, "data_bound": True, "logs_at_once": True},
    "fast-logs-at-once": {"train": {"speed": "auto"}, "logs_at_once": True},
    "small-before": {"train": {"speed": "small"}, "plan": {"rows": 2, "grad_accum": 4, "offload": False},
                     "before": True},
    "small-flex": {"train": {"speed": "small"}, "plan": {"attn_implementation": "flex_attention", "compile": False}},
    "small-l4": {"train": {"speed": "auto"}, "cap_gib": 22.0},  # what an L4 (24 GB) runs, in 22 GiB
    "small-t4": {"train": {"speed": "auto"}, "cap_gib": 15.0, "t4": True},  # a T4's plan in 15 GiB
    # Unsloth 2026.10 on the same model and data: the seed notebook's recipe, then packed 8 x 2048.
    "unsloth-recipe": {"unsloth": {"rows": 2, "accum": 4, "packing": False, "checkpointing": "unsloth"}},
    "unsloth-packed": {"unsloth": {"rows": 8, "accum": 1, "packing": True, "checkpointing": "unsloth"}},
    "unsloth-packed-nockpt": {"unsloth": {"rows": 8, "accum": 1, "packing": True, "checkpointing": False}},
}


# ----------------------------------------------------------------------------- data and model

def synthetic_examples(n: int, vocab: int, scale: float, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pre-tokenized prompt/completion examples with AmazonTitles-like lengths (scale=1: prompt
    ~75 tokens, completion ~165, total ~240) and random token ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = max(4, int(rng.integers(55, 96) * scale))
        c = max(4, int(np.clip(rng.lognormal(np.log(140), 0.6), 8, 1500) * scale))
        ids = rng.integers(10, vocab, p + c).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * p + [1] * c})
    return rows


def n_params(shape: str) -> float:
    """Parameters of a model of `shape` (embeddings and LM head included): the N of 6N."""
    s = SHAPES[shape]
    d, f, layers, heads, kv = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                               s["num_attention_heads"], s["num_key_value_heads"])
    attn = d * d * 2 + 2 * d * (d // heads) * kv
    return layers * (attn + 3 * d * f) + 2 * s["vocab_size"] * d


def make_model_dir(folder: Path, tiny: bool, shape: str = "llama") -> Path:
    """A random-weight model (`shape`'s sizes, or tests/tiny.py's) with the tiny tokenizer, bf16 safetensors."""
    import torch
    from tiny import build_llama, build_phi3, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    tok = build_tokenizer()
    if tiny:
        model = (build_llama if shape == "llama" else build_phi3)(tok)
    else:
        cls, config_cls = (LlamaForCausalLM, LlamaConfig) if shape == "llama" else (Phi3ForCausalLM, Phi3Config)
        config = config_cls(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end|>"),
                            bos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = cls(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if not tiny:
        torch.cuda.empty_cache()  # GPU 0 is the workers' from here on
    return folder


def pretend_card(cap_gib: float | None, t4: bool) -> None:
    """Make this process run as on a smaller card: its memory capped at `cap_gib` (and the plan chosen
    for that memory); with `t4`, no bf16 (fp16 compute, as models.compute_dtype picks on a T4) and a
    T4's compute capability for the plan (no flash attention). The capability goes to the plan alone
    (`fast.read_card`): kernels compiled for sm75 would not load on this card."""
    import torch

    from prodtune import fast

    real = fast.read_card(0)
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib / real.memory_gib))
    if t4:
        torch.cuda.is_bf16_supported = lambda *a, **k: False
    fast.read_card = lambda device=None: fast.Card(cap_gib or real.memory_gib, (7, 5) if t4 else real.capability,
                                                   real.bf16 and not t4)


# ----------------------------------------------------------------------------- one configuration

def run_config(name: str, model_dir: Path, tiny: bool, warmup: int, steps: int, n_examples: int,
               per_gpu_batch: bool = False, step_tokens: int = DEFAULT_STEP,
               shape: str = "llama") -> dict | None:
    """Time one prodtune configuration in this process (one rank of several under accelerate
    launch) through the train stage's own plan and trainer; the result on rank 0, None on the others."""
    import torch
    from datasets import Dataset

    from prodtune import distributed, models, train
    from prodtune import plan as plan_mod
    from prodtune.config import LoraConfig, ModelConfig, TrainConfig
    from prodtune.io import read_json

    spec = CONFIGS[name]
    processes = distributed.world_size()  # joins the process group under accelerate launch
    t0 = time.perf_counter()

    def mark(what: str) -> None:  # where a launch's time goes (model load, compile, ...), in its log
        print(f"[rank {distributed.process_index()} +{time.perf_counter() - t0:.1f} s] {what}", flush=True)

    cuda = torch.cuda.is_available() and not tiny
    if cuda:
        pretend_card(spec.get("cap_gib"), spec.get("t4", False))
    if per_gpu_batch:
        step_tokens *= processes  # each GPU keeps the one-GPU micro-batch: N times the tokens per step
    train_cfg = TrainConfig(
        max_length=256 if tiny else 2048, device="cuda" if cuda else "cpu", step_tokens=step_tokens,
        max_steps=warmup + steps + (profiled_steps() if os.environ.get("BENCH_PROFILE") == name and cuda else 0),
        logging_steps=1, eval_steps=0, save_steps=10**9, optim="adamw_8bit" if cuda else "adamw_torch")
    train_cfg = dataclasses.replace(train_cfg, **spec.get("train", {}))
    if tiny:
        train_cfg = dataclasses.replace(train_cfg, step_tokens=max(256, train_cfg.step_tokens // 8), device="cpu",
                                        gradient_checkpointing=False,
                                        speed="plain" if train_cfg.speed == "plain" else "auto")
    model_cfg = ModelConfig(name_or_path=str(model_dir), load_in_4bit=True, dtype="auto" if cuda else "float32")
    lora_cfg = LoraConfig()  # r=32, alpha=64, all-linear

    n_examples = n_examples * max(1, step_tokens // DEFAULT_STEP)  # the same number of steps per epoch
    vocab = read_json(model_dir / "config.json")["vocab_size"]
    scale = 0.25 if tiny else 1.0
    data = Dataset.from_list(synthetic_examples(n_examples, vocab, scale))
    probe = synthetic_examples(8, vocab, scale, seed=1)
    plan = plan_mod.make_plan(train_cfg, model_cfg, example_tokens=plan_mod.mean_example_tokens(data, None, train_cfg.max_length))
    if tiny and plan.speed == "plain" and train_cfg.speed != "plain":
        # No speed path on a CPU: exercise its components (packing, varlen attention's CPU reference,
        # dequantize-once) in fp32, 2 rows per micro-batch, the step shared by the processes.
        from prodtune import fast

        batch = distributed.split_batch(2, max(1, step_tokens // DEFAULT_STEP), processes)
        speed = fast.SpeedPlan("fast", "cpu check", rows=batch.per_device, max_length=train_cfg.max_length,
                               grad_accum=batch.accum, checkpoint_every=0, dequantize_once=True,
                               attn_implementation=fast.VARLEN)
        plan = dataclasses.replace(plan, speed="fast", speed_plan=speed, packing=True, batch=batch)
    if spec.get("plan") and plan.speed != "plain":
        speed = dataclasses.replace(plan.speed_plan, **spec["plan"])
        batch = dataclasses.replace(plan.batch, per_device=speed.rows, accum=speed.grad_accum)  # one batch
        plan = dataclasses.replace(plan, speed_plan=speed, batch=batch,
                                   gradient_checkpointing=speed.checkpoint_every > 0)

    if spec.get("before"):
        use_previous_fast_path()
    if spec.get("mask_head"):
        from prodtune import lm_head

        lm_head.select_by_position = lambda *args, **kwargs: False  # TRL's head: a boolean mask read back
    if spec.get("data_bound"):
        from prodtune import fast

        fast.steady_kwargs = functools.partial(fast.steady_kwargs, per_batch=False)
    t_load = time.perf_counter()
    tok = models.load_tokenizer(model_cfg, str(model_dir))
    model = models.load_model(model_cfg, plan.device, training=True, path=str(model_dir),
                              gradient_checkpointing=plan.gradient_checkpointing)
    model_load_s = time.perf_counter() - t_load
    mark(f"model loaded ({model_load_s:.1f} s)")
    clock = train.step_clock(t_load, cuda)
    losses = Losses()
    trainer = train.build_trainer(model, tok, data, None, lora_cfg, train_cfg, plan,
                                  Path(tempfile.mkdtemp(prefix="bench-train-")), callbacks=[clock, losses])
    if spec.get("logs_at_once"):
        trainer.late_logs = False
    if os.environ.get("BENCH_PROFILE") == name and cuda:
        trainer.add_callback(Profiler(warmup + steps, profiled_steps()))  # more steps, after the timed ones
    mark("trainer ready")
    probe_start = time.perf_counter()
    probe_loss = probe_batch_loss(trainer, trainer.data_collator, probe, cuda)
    probe_s = time.perf_counter() - probe_start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    mark("trained")
    return result_row(name, plan.speed_plan.describe(), getattr(trainer, "prodtune_speed", {}), clock,
                      warmup, steps, cuda, probe_loss, losses.losses,
                      first_step_s=clock.first_step_s - probe_s, model_load_s=model_load_s,
                      flops_factor=(plan.speed_plan.flops_factor if plan.speed != "plain"
                                    else 6.0 if plan.gradient_checkpointing else 4.0), shape=shape,
                      extra={"processes": processes, "per_device_batch": plan.batch.per_device,
                             "grad_accum": plan.batch.accum, "global_batch": plan.batch.global_batch,
                             "per_gpu_batch_kept": per_gpu_batch, "step_tokens": plan.step_tokens,
                             "step_examples": round(plan.step_examples or 0, 2), "users_clock": clock.summary(),
                             "cap_gib": spec.get("cap_gib"), "t4_plan": spec.get("t4", False),
                             "precision": plan.precision, "compile": compile_stats()})


def use_previous_fast_path() -> None:
    """Switch this process back to the speed paths as they were before they stopped waiting for the
    GPU inside a step (for a before/after in one call): TRL's trainer and LM head, attention sized to
    the row, the padding as one-token examples, transformers' NaN filter and blocking batch copies."""
    from trl import SFTTrainer

    from prodtune import fast, lm_head

    overrides = fast.sft_overrides
    fast.trainer_class = lambda speed: SFTTrainer
    lm_head.select_by_position = lambda *args, **kwargs: False
    fast.longest_example = lambda *datasets: None
    fast.OnePaddingSegment = lambda collate: collate
    fast.sft_overrides = lambda speed: {k: v for k, v in overrides(speed).items()
                                        if k not in ("logging_nan_inf_filter", "accelerator_config")}


def Losses() -> Any:
    """A callback keeping the training loss of each optimizer step (the Trainer's mean over processes)."""
    from transformers import TrainerCallback

    class _Losses(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 5))

    return _Losses()


def compile_stats() -> dict[str, Any]:
    """How many graphs dynamo compiled and where its compile time went (empty without compiling)."""
    try:
        from torch._dynamo.utils import compile_times, counters
    except ImportError:
        return {}
    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "frames_compiled": counters["frames"].get("ok", 0),
            "times": compile_times(repr="str", aggregate=True)[-2000:]}


def result_row(name: str, plan: str, prepared: dict, clock: Any, warmup: int, steps: int, cuda: bool,
               probe_loss: float | None, losses: list[float], *, first_step_s: float,
               model_load_s: float, flops_factor: float, shape: str, extra: dict) -> dict | None:
    """The JSON row of one configuration (rank 0), from the step clock: the seconds and the non-padding
    tokens (the Trainer's count over all processes) of each optimizer step."""
    import torch

    from prodtune import distributed

    measured = clock.steps  # waits for the GPU to pass every step's end
    marks = [s for s, _ in measured]
    n_steps = warmup + steps
    timed = sum(marks[warmup:n_steps])
    tokens, trained = sum(t for _, t in measured[warmup:n_steps]), sum(t for _, t in measured[:n_steps])
    peaks = distributed.gather((round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                round(torch.cuda.max_memory_reserved() / 2**30, 2)) if cuda else (None, None))
    if not distributed.is_main_process():
        return None
    tps = tokens / timed if timed else 0.0
    processes = extra.get("processes", 1)
    return {
        "config": name, "plan": plan, "prepared": prepared, **extra,
        "tokens_per_s": round(tps, 1),
        "step_s": round(timed / steps, 4),
        "tokens_per_step": round(tokens / steps, 1),
        "first_step_s": round(first_step_s, 1),
        "model_load_s": round(model_load_s, 1),
        "step_times_s": [round(s, 3) for s in marks],
        "peak_alloc_gib": max((a for a, _ in peaks), default=None) if cuda else None,
        "peak_reserved_gib": max((r for _, r in peaks), default=None) if cuda else None,
        "peak_alloc_gib_per_gpu": [a for a, _ in peaks] if cuda else None,
        "flops_per_token": f"{flops_factor:g}N",
        "mfu": round(tps * flops_factor * n_params(shape) / PEAK_FLOPS / processes, 4),  # per GPU
        "probe_loss": probe_loss,
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "tokens_trained": trained,  # over all warmup + timed steps: the samples behind final_loss
        "warmup_steps": warmup, "timed_steps": steps,
    }


def profiled_steps() -> int:
    """How many optimizer steps BENCH_PROFILE profiles (BENCH_PROFILE_STEPS, default 1)."""
    return max(1, int(os.environ.get("BENCH_PROFILE_STEPS", "1")))


def Profiler(step: int, count: int = 1) -> Any:
    """A callback that profiles optimizer steps `step` .. `step + count - 1` (CPU and CUDA, with the
    logging and batch loading between them), prints the top CUDA kernels and where the GPU waited
    (`idle_gaps`), and writes the trace to $OUT/trace-step<step>.json.gz."""
    import torch
    from transformers import TrainerCallback

    class _Profiler(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step and self.prof is None:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or state.global_step < step + count:
                return
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            print(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
            try:
                print(idle_gaps(self.prof.events()), flush=True)
                if os.environ.get("OUT"):
                    self.prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"trace-step{step}.json.gz"))
            except Exception as e:  # the analysis must not cost the measurement
                print(f"profile analysis failed: {e!r}", flush=True)
            self.prof = None

    return _Profiler()


def idle_gaps(events: Any, top: int = 25, min_us: float = 100.0) -> str:
    """How busy the GPU was in a profiled window: kernel time, the union of kernel intervals, and the
    longest gaps between kernels with the CPU operations running when each gap began."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if not kernels:
        return "no CUDA kernels in the profile"
    busy, gaps, end = 0.0, [], kernels[0][0]
    for a, b in kernels:
        if a > end:
            gaps.append((a - end, end))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    window = end - kernels[0][0]
    lines = [f"GPU window {window / 1e3:.1f} ms, kernels busy {busy / 1e3:.1f} ms ({busy / window:.0%}), "
             f"idle {(window - busy) / 1e3:.1f} ms in {len(gaps)} gaps; gaps > {min_us:g} us: "
             f"{sum(g for g, _ in gaps if g > min_us) / 1e3:.1f} ms in {sum(1 for g, _ in gaps if g > min_us)}"]
    for gap, start in sorted(gaps, reverse=True)[:top]:
        running = sorted((e for e in cpu if e.time_range.start <= start <= e.time_range.end),
                         key=lambda e: e.time_range.start)
        names = " > ".join(e.name[:40] for e in running[-4:])
        lines.append(f"  {gap / 1e3:7.2f} ms at +{(start - kernels[0][0]) / 1e3:7.1f} ms: {names}")
    return "\n".join(lines)


def probe_batch_loss(trainer: Any, collate: Any, probe: list[dict], cuda: bool) -> float:
    """Loss on the same 8 examples for every configuration, before any update (LoRA B = 0), without
    gradients: compiled layers run eagerly then, so the first training step still pays the compile."""
    import torch

    feats = [{"input_ids": p["input_ids"],
              "labels": [i if m else -100 for i, m in zip(p["input_ids"], p["completion_mask"])]} for p in probe]
    batch = {k: (v.to(trainer.model.device) if hasattr(v, "to") else v) for k, v in collate(feats).items()}
    dtype = torch.float16 if trainer.args.fp16 else torch.bfloat16
    ctx = torch.autocast("cuda", dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)
    trainer.model.train()
    with ctx, torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return round(float(loss.detach()), 5)


# ----------------------------------------------------------------------------- driver

def card_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for card in ("h200", "h100", "a100", "l4", "t4"):
        if card in name:
            return card
    return name.replace(" ", "-")


def matmul_tflops() -> float | None:
    """The card's bf16 matmul rate on random 8192^3 products (the MFU ceiling actually seen)."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return round(2 * 8192**3 * 20 / (time.perf_counter() - start) / 1e12, 1)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def table(results: list[dict]) -> str:
    """One row per configuration: speed, time to first step, memory, MFU, probe and final loss."""
    ref = next((r["tokens_per_s"] for r in results if r["config"] == "reference" and "tokens_per_s" in r), None)
    lines = [f"{'config':22} {'tok/s':>8} {'x ref':>6} {'step s':>7} {'tok/step':>8} {'1st step s':>10} "
             f"{'load s':>6} {'peak GiB':>8} {'FLOPs':>5} {'MFU':>6} {'probe':>8} {'loss@end':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:22} FAILED: {r['error'][-300:]}")
            continue
        x = f"{r['tokens_per_s'] / ref:.1f}" if ref else "-"
        probe = f"{r['probe_loss']:.4f}" if r.get("probe_loss") is not None else "-"
        lines.append(f"{r['config']:22} {r['tokens_per_s']:8.0f} {x:>6} {r['step_s']:7.3f} {r['tokens_per_step']:8.0f} "
                     f"{r['first_step_s']:10.1f} {r['model_load_s']:6.1f} "
                     f"{r['peak_alloc_gib'] if r['peak_alloc_gib'] is not None else '-':>8} {r['flops_per_token']:>5} "
                     f"{r['mfu']:6.1%} {probe:>8} {r['final_loss'] if r['final_loss'] is not None else '-':>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scaling over GPUs

def launch_command(n: int, tiny: bool, config_file: str | None = None) -> list[str]:
    """`accelerate launch` for n processes (one per GPU; gloo processes on a CPU with --tiny), with
    an accelerate config file (FSDP) when given."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1"]
    if config_file:
        return cmd + ["--config_file", config_file, "--main_process_port", "29511"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]  # torchrun underneath; a free port
    return cmd


def visible_gpus(n: int) -> str:
    """CUDA_VISIBLE_DEVICES for the first n of the GPUs this process may use."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = current.split(",") if current else [str(i) for i in range(n)]
    return ",".join(ids[:n])


def run_scaling(a: argparse.Namespace, name: str, model_dir: Path, header: dict, card: str, warmup: int,
                steps: int, n_examples: int, deadline: float | None) -> list[dict]:
    """Launch `name` on each GPU count of --gpus in turn ('4p': 4 GPUs, per-GPU batch kept);
    write scaling-<card>-x<N>[-pergpu].json for each. A launch that would not end before
    `deadline` (judged by the slowest launch so far) is skipped."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log-scaling.txt"
    runs = [(int(x.rstrip("p")), x.endswith("p")) for x in a.gpus.split(",")]
    available = max(n for n, _ in runs) if a.tiny else torch_device_count()  # CPU processes: any count
    results: list[dict] = []
    for n, per_gpu in runs:
        left = deadline - time.time() if deadline else a.timeout
        need = max([45.0] + [r["process_s"] for r in results if "tokens_per_s" in r])
        base = {"config": name, "processes": n, "per_gpu_batch_kept": per_gpu, "step_tokens": a.step_tokens}
        if n > available:
            result = {**base, "error": f"only {available} GPUs visible"}
        elif left < need:
            result = {**base, "error": f"skipped: {left:.0f} s of the time budget left, a launch takes ~{need:.0f} s"}
        else:
            cmd = launch_command(n, a.tiny, a.accelerate_config) + [
                __file__, "--worker", name, "--model-dir", str(model_dir), "--warmup", str(warmup),
                "--steps", str(steps), "--examples", str(n_examples)]
            cmd += ["--tiny"] if a.tiny else []
            cmd += ["--per-gpu-batch"] if per_gpu else []
            cmd += ["--step-tokens", str(a.step_tokens), "--shape", a.shape]
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            if not a.tiny:
                env["CUDA_VISIBLE_DEVICES"] = visible_gpus(n)
            result, text = _launch(cmd, env, int(min(a.timeout, left)), base)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"\n===== {name} on {n} {'process' if a.tiny else 'GPU'}(s): {' '.join(cmd)}\n{text}")
        results.append(result)
        print(json.dumps(result), flush=True)
        step = "" if a.step_tokens == DEFAULT_STEP else f"-step{a.step_tokens // 1024}k"
        path = out / f"scaling-{card}-x{n}{'-pergpu' if per_gpu else ''}{step}.json"
        path.write_text(json.dumps({**header, "result": result}, indent=2))
    return results


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _launch(cmd: list[str], env: dict, timeout: int, base: dict) -> tuple[dict, str]:
    """Run a worker command; its RESULT line, or the error, and its output."""
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {**base, "error": text[-3000:]}
    except subprocess.TimeoutExpired as e:
        text = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        result = {**base, "error": f"timeout after {timeout} s"}
    result["process_s"] = round(time.time() - started, 1)
    return result, text


def scaling_table(results: list[dict], one: dict | None = None) -> str:
    """One row per run: throughput, speed-up and efficiency against `one` (default: the one-GPU
    run among `results`), per-GPU micro-batch, memory of each GPU, and the loss at the last step."""
    one = one or next((r for r in results if r.get("processes") == 1 and "tokens_per_s" in r), None)
    lines = [f"{'GPUs':>4} {'batch':>7} {'tok/s':>9} {'speed-up':>8} {'effic.':>6} {'step s':>7} {'tok/step':>9} "
             f"{'rows/GPU':>8} {'peak GiB per GPU':>22} {'loss@end':>9} {'Δ vs 1':>8} {'tokens':>9}"]
    for r in results:
        n = r.get("processes", "?")
        mode = "per-GPU" if r.get("per_gpu_batch_kept") else "global"
        if "error" in r:
            lines.append(f"{n:>4} {mode:>7} FAILED: {r['error'][-300:]}")
            continue
        speedup = r["tokens_per_s"] / one["tokens_per_s"] if one else None
        peaks = ",".join(f"{p:g}" for p in r["peak_alloc_gib_per_gpu"]) if r.get("peak_alloc_gib_per_gpu") else "-"
        loss = r.get("final_loss")
        delta = (f"{loss - one['final_loss']:+.4f}" if one and loss is not None and one.get("final_loss") is not None
                 else "-")
        lines.append(
            f"{n:>4} {mode:>7} {r['tokens_per_s']:9.0f} {f'{speedup:.2f}x' if speedup else '-':>8} "
            f"{f'{speedup / n:.0%}' if speedup else '-':>6} {r['step_s']:7.3f} {r['tokens_per_step']:9.0f} "
            f"{r['per_device_batch']:>8} {peaks:>22} {loss if loss is not None else '-':>9} {delta:>8} "
            f"{r['tokens_trained']:>9}")
    return "\n".join(lines)


def summarize(folder: Path) -> None:
    """Print every scaling-*.json in `folder` as one table per card and step size (train.step_tokens),
    each against the one-GPU run of the same step size."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("scaling-*.json"))]
    groups = sorted({(r["card"], r["result"].get("step_tokens", DEFAULT_STEP)) for r in runs})
    for card, step in groups:
        mine = [r for r in runs if r["card"] == card and r["result"].get("step_tokens", DEFAULT_STEP) == step]
        results = sorted((r["result"] for r in mine),
                         key=lambda x: (bool(x.get("per_gpu_batch_kept")), x.get("processes", 0)))
        one = next((x for x in results if x.get("processes") == 1 and "tokens_per_s" in x), None)
        head = mine[0]
        print(f"\n{card} ({head.get('device', 'cpu')}), {head['versions']}; {head['warmup']} warm-up + "
              f"{head['steps']} timed optimizer steps; global = train.step_tokens={step} tokens per optimizer "
              f"step shared by the GPUs (the same optimisation on any count), per-GPU = each GPU keeps the "
              f"one-GPU micro-batch; loss@end after the same samples for every 'global' row")
        print(scaling_table(results, one))


def worker_env(name: str, a: argparse.Namespace, cache_root: Path) -> dict[str, str]:
    """The environment of one configuration's process: its own empty compile cache (a cold start)
    unless --warm-cache, and Unsloth's install first on the path for Unsloth configurations."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    if not a.warm_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / name)
    if CONFIGS[name].get("unsloth"):
        if not a.unsloth_site:
            raise SystemExit(f"{name}: give --unsloth-site (Unsloth's install, see bench_unsloth.py)")
        env["PYTHONPATH"] = os.pathsep.join([a.unsloth_site, env.get("PYTHONPATH", "")])
    return env


def run_worker(cmd: list[str], env: dict[str, str], timeout: int, name: str) -> tuple[dict, str]:
    """One configuration's process: its RESULT line (or the error) and its output."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        return (json.loads(line[7:]) if line else {"config": name, "error": out[-3000:]}), out
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        return {"config": name, "error": f"timeout after {timeout} s"}, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (a check, not a timing)")
    ap.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--shape", default="llama", choices=list(SHAPES),
                    help="the random model: llama (Phi-3-mini sizes, Unsloth's shape), phi3, phi3-medium (14B)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (compilation happens here)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    ap.add_argument("--examples", type=int, default=None, help="synthetic training examples")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for train-<card>.json")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--warm-cache", action="store_true",
                    help="share the compile cache between configurations (default: each starts cold)")
    ap.add_argument("--unsloth-site", default=None, help="folder Unsloth is installed in (pip --target)")
    ap.add_argument("--gpus", default=None,
                    help="scaling: comma list of GPU counts for one config, e.g. 1,2,4; '4p' = 4 GPUs each "
                         "keeping the one-GPU micro-batch (global batch x 4)")
    ap.add_argument("--accelerate-config", default=None, help="scaling: accelerate config file (e.g. FSDP)")
    ap.add_argument("--budget", type=int, default=0,
                    help="scaling: seconds from the start for everything; launches that would overrun are skipped")
    ap.add_argument("--per-gpu-batch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step-tokens", type=int, default=DEFAULT_STEP,
                    help="train.step_tokens: tokens per optimizer step shared by all GPUs (65536: every one of "
                         "4 GPUs keeps a full 16k micro-batch)")
    ap.add_argument("--summarize", default=None, metavar="DIR", help="print the scaling-*.json of DIR as one table")
    ap.add_argument("--model-dir", default=None, help="an existing model folder (default: a new random one)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    started = time.time()
    if a.summarize:
        summarize(Path(a.summarize))
        return
    if a.gpus and not a.configs:
        a.configs = "fast-eager" if a.tiny else "fast"
    names = (a.configs or ("reference,fast,small" if a.tiny else "reference,plain,fast,small")).split(",")
    warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    steps = a.steps if a.steps is not None else (2 if a.tiny else 5)
    n_examples = a.examples or (64 if a.tiny else 1200)

    if a.worker:
        if CONFIGS[a.worker].get("unsloth"):
            from bench_unsloth import run_unsloth  # before anything imports transformers

            result = run_unsloth(a.worker, CONFIGS[a.worker]["unsloth"], Path(a.model_dir), warmup, steps, n_examples)
        else:
            result = run_config(a.worker, Path(a.model_dir), a.tiny, warmup, steps, n_examples,
                                per_gpu_batch=a.per_gpu_batch, step_tokens=a.step_tokens, shape=a.shape)
        if result is not None:  # rank 0
            print("RESULT " + json.dumps(result), flush=True)
        return

    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    card = card_name() if not a.tiny else "cpu-tiny"
    header = {"card": card, "versions": versions(), "matmul_tflops": matmul_tflops() if not a.tiny else None,
              "shape": a.shape, "n_params": n_params(a.shape), "peak_flops_for_mfu": PEAK_FLOPS,
              "warmup": warmup, "steps": steps, "cold_start": not a.warm_cache}
    if card != "cpu-tiny":
        import torch

        header["device"] = torch.cuda.get_device_name()
    print(json.dumps(header), flush=True)
    results = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir = Path(a.model_dir) if a.model_dir else make_model_dir(Path(tmp), a.tiny, a.shape)
        if a.gpus:
            if len(names) != 1:
                ap.error("--gpus times one configuration; give one name in --configs")
            deadline = started + a.budget if a.budget else None
            results = run_scaling(a, names[0], model_dir, header, card, warmup, steps, n_examples, deadline)
            print(f"\n{card} ({header.get('device', 'cpu')}): {names[0]} on {a.gpus} "
                  f"{'processes' if a.tiny else 'GPUs'}, {warmup} warm-up + {steps} timed steps")
            print(scaling_table(results))
            return
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir), "--shape", a.shape,
                   "--warmup", str(warmup), "--steps", str(steps), "--examples", str(n_examples)]
            cmd += ["--tiny"] if a.tiny else []
            begun = time.time()
            result, text = run_worker(cmd, worker_env(name, a, Path(tmp) / "compile-cache"), a.timeout, name)
            result["process_s"] = round(time.time() - begun, 1)
            with open(out / f"log-train-{card}.txt", "a", encoding="utf-8") as f:
                f.write(f"\n===== {name}: {' '.join(cmd)}\n{text}")
            results.append(result)
            print(json.dumps(result), flush=True)
            (out / f"train-{card}.json").write_text(json.dumps({**header, "results": results}, indent=2))
    print(f"\n{card} ({header.get('device', 'cpu')}), {a.shape} shape, N = {n_params(a.shape):.3g}; "
          f"{'cold' if not a.warm_cache else 'shared'} compile caches; MFU at {PEAK_FLOPS / 1e12:.0f} TFLOP/s; "
          f"matmul measured {header['matmul_tflops']} TFLOP/s")
    print(table(results))


if __name__ == "__main__":
    main()
