"""Unsloth's configurations for bench_train.py: the same model folder, data and timing, Unsloth's stack.

Run by bench_train.py in a worker process whose Python path starts with Unsloth's install
(../shared/tools/device-wheels.sh --unsloth: Unsloth 2026.10 wants trl <= 1.15 and datasets < 5,
so it lives apart from prodtune's environment), never imported by prodtune. Unsloth must be imported
before transformers and TRL: it patches them.

What it runs, as the seed notebook's stack would: FastLanguageModel.from_pretrained (4-bit NF4,
bf16), get_peft_model (LoRA r=32, alpha=64, dropout 0 on the 7 projections; Unsloth's own
gradient checkpointing or none) and TRL's SFTTrainer with the same hyperparameters as prodtune
(lr 2e-4 linear, 10 warm-up steps, 8-bit AdamW, weight decay 0.01, seed 3407, max length 2048,
loss on completions only), either padded 2 x 4 examples (the original recipe) or packed 8 x 2048.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_unsloth(name: str, spec: dict[str, Any], model_dir: Path, warmup: int, steps: int,
                n_examples: int) -> dict[str, Any] | None:
    """Time one Unsloth configuration in this process; the bench_train result row."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  (patches transformers and TRL: first)
    import torch
    from bench_train import Losses, result_row, synthetic_examples
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from prodtune.train import step_clock

    ckpt = spec["checkpointing"]
    t_load = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=True,
        use_gradient_checkpointing=ckpt, random_state=3407)
    model = FastLanguageModel.get_peft_model(
        model, r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing=ckpt, random_state=3407)
    model_load_s = time.perf_counter() - t_load
    print(f"[unsloth +{model_load_s:.1f} s] model loaded", flush=True)

    vocab = model.config.vocab_size
    data = Dataset.from_list(synthetic_examples(n_examples, vocab, 1.0))
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-unsloth-"), max_steps=warmup + steps,
        per_device_train_batch_size=spec["rows"], gradient_accumulation_steps=spec["accum"],
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=10, weight_decay=0.01, optim="adamw_8bit",
        max_grad_norm=1.0, seed=3407, max_length=2048, packing=spec["packing"], completion_only_loss=True,
        bf16=True, fp16=False, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    clock, losses = step_clock(t_load, True), Losses()
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=args,
                         callbacks=[clock, losses])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    plan = (f"unsloth: {spec['rows']} x {'2048 packed' if spec['packing'] else 'examples, padded'} x "
            f"{spec['accum']} accumulation, checkpointing {ckpt or 'off'}")
    return result_row(name, plan, {}, clock, warmup, steps, True, None, losses.losses,
                      first_step_s=clock.first_step_s, model_load_s=model_load_s,
                      flops_factor=6.0 if ckpt else 4.0, shape="llama",
                      extra={"processes": 1, "per_device_batch": spec["rows"], "grad_accum": spec["accum"],
                             "global_batch": spec["rows"] * spec["accum"], "step_tokens": None,
                             "unsloth": _version()})


def _version() -> str:
    import importlib.metadata as md

    return md.version("unsloth")
