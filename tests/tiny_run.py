"""A finished-looking run folder for the comparison tests: test split, LoRA adapter, training log.

The adapter is a real PEFT LoRA adapter on the tiny random model, initialised with non-zero B
matrices so the "tuned" model answers differently from the base.
"""

from __future__ import annotations

import json
from pathlib import Path

from prodtune.config import Config, save_config
from prodtune.io import RunPaths, write_jsonl
from prodtune.prompts import build_prompt

TITLES = ["Mog's Kittens", "The Very Hungry Caterpillar", "Klutz Book of Knots",
          "Harry Potter Paperback Box Set", "Garden Hose 50 ft <script>alert('t')</script>",
          "Stainless Steel Water Bottle", "Lego Classic Creative Bricks", "USB-C Charging Cable"]


def product_rows(n: int = 8) -> list[dict]:
    """Format-stage rows (the brief's contract) about n products."""
    rows = []
    for i in range(n):
        title = TITLES[i % len(TITLES)] + ("" if i < len(TITLES) else f" {i}")
        rows.append({
            "prompt": build_prompt(f"Describe the product '{title}'.", "You describe products."),
            "completion": [{"role": "assistant",
                            "content": f"{title} is a product for everyone. It comes in a box <b>new</b>."}],
            "title": title, "uid": f"u{i}"})
    return rows


def save_adapter(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter (r=4 on all linear layers, random B) and the tokenizer, saved like training does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def make_run(root: Path, model_dir: Path, n_items: int = 8, **eval_overrides) -> Config:
    """Config + run folder with format/test.jsonl, train/adapter and train/log.jsonl."""
    cfg = Config(run_name="tiny", output_dir=str(root))
    cfg.model.name_or_path = str(model_dir)
    cfg.model.dtype = "float32"
    cfg.data.system_prompt = "You describe products."
    cfg.eval.max_new_tokens = 12
    cfg.eval.batch_size = 4
    cfg.eval.bootstrap_samples = 200
    cfg.eval.embedding_model = ""
    for key, value in eval_overrides.items():
        setattr(cfg.eval, key, value)
    paths = RunPaths(root)
    save_config(cfg, paths.config)
    write_jsonl(paths.split("test"), product_rows(n_items))
    save_adapter(model_dir, paths.adapter)
    log = [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 9)]
    log += [{"step": s, "eval_loss": 3.1 - 0.15 * s} for s in (4, 8)]
    paths.train_log.write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")
    return cfg
