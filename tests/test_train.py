"""Training stage on a random-init tiny Phi-3 (CPU, offline): CLI smoke run, label mask, resume,
4-bit QLoRA path and merging. The real demo model trains only in the one `slow` test."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from prodtune import plan as plan_mod
from prodtune import train as train_mod
from prodtune.cli import main
from prodtune.config import DEFAULT_SYSTEM_PROMPT, load_config
from prodtune.io import RunPaths, write_jsonl
from prodtune.prompts import build_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "trn.json"


def write_format(run_dir: Path, n_train: int = 16, n_val: int = 4, max_chars: int = 160) -> None:
    """format/{train,validation}.jsonl from the shipped sample, as the format stage writes them."""
    rows = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        content = html.unescape(r["content"] or "").strip()[:max_chars]
        if len(content) >= 20:
            rows.append({"prompt": build_prompt(f"Describe the product '{r['title']}'.", DEFAULT_SYSTEM_PROMPT),
                         "completion": [{"role": "assistant", "content": content}],
                         "title": r["title"], "uid": r["uid"]})
    paths = RunPaths(run_dir)
    write_jsonl(paths.split("train"), rows[:n_train])
    write_jsonl(paths.split("validation"), rows[n_train:n_train + n_val])


def tiny_args(run_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    """Overrides for a few quick steps of the tiny model on the CPU."""
    return [f"output_dir={run_dir}", f"model.name_or_path={model_dir}", "train.device=cpu",
            "train.batch_size=2", "train.step_tokens=330", "train.max_steps=4", "train.max_length=256",
            "train.learning_rate=5e-3", "train.warmup_steps=0", "train.optim=adamw_torch",
            "train.eval_steps=2", "train.save_steps=2", "train.max_eval_samples=4",
            "lora.r=4", "lora.alpha=8", *extra]


def spy_trainer(monkeypatch) -> list:
    """Record the SFTTrainer that train_stage builds, to inspect its model after training."""
    seen = []
    original = train_mod.build_trainer

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(train_mod, "build_trainer", spy)
    return seen


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """One tiny training run through the CLI, shared by the smoke and merge tests."""
    run_dir = tmp_path_factory.mktemp("run")
    write_format(run_dir)
    mp = pytest.MonkeyPatch()
    seen = spy_trainer(mp)
    try:
        assert main(["train", *tiny_args(run_dir, tiny_model_dir)]) == 0
    finally:
        mp.undo()
    return run_dir, seen[0]


def test_train_cli_writes_adapter_logs_and_report(trained_run, tiny_model_dir):
    run_dir, trainer = trained_run
    paths = RunPaths(run_dir)
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (paths.adapter / f).is_file(), f
    assert paths.loss_png.stat().st_size > 1000 and paths.config.is_file()
    assert list((paths.train / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    rows = [json.loads(line) for line in paths.train_log.read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert [r["step"] for r in rows if r["eval_loss"] is not None] == [0, 2, 4]
    assert {"step", "loss", "eval_loss", "lr", "tokens_seen", "time"} <= rows[-1].keys()

    report = json.loads(paths.train_report.read_text())
    assert report["steps"] == 4 and report["examples"] == 16 and report["eval_examples"] == 4
    assert report["device"] == "cpu" and report["precision"] == "float32"
    assert report["lora_targets"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert report["tokens_seen"] == rows[-1]["tokens_seen"] > 0 and report["tokens_per_s"] > 0
    assert math.isfinite(report["final_eval_loss"]) and report["peak_memory_gib"] > 0

    # LoRA B starts at zero: non-zero now means the adapter trained; and it is what was saved.
    saved = load_file(paths.adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    # Base weights are frozen and unchanged after training.
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert not param.requires_grad, name
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param.detach().cpu(), base[key]), name


def test_label_mask_trains_completion_and_end_of_turn_only(tiny_model_dir, tmp_path):
    from prodtune import models
    from prodtune.config import LoraConfig, ModelConfig, TrainConfig

    write_format(tmp_path, n_train=6, n_val=0)
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    tokenizer = models.load_tokenizer(model_cfg)
    model = models.load_model(model_cfg, "cpu", training=True)
    train_ds, _ = train_mod.load_splits(RunPaths(tmp_path), None)
    train_cfg = TrainConfig(max_length=512, device="cpu", optim="adamw_torch")
    plan = train_mod.make_plan(train_cfg, model_cfg, train_mod.mean_example_tokens(train_ds, tokenizer, 512))
    trainer = train_mod.build_trainer(model, tokenizer, train_ds, None, LoraConfig(r=4), train_cfg, plan,
                                      tmp_path / "ckpt")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for raw, ex in zip(train_ds, trainer.train_dataset, strict=True):
        prompt_ids = tokenizer.apply_chat_template(raw["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        n = len(prompt_ids)
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[:n] == prompt_ids  # the model's own template, as at inference
        assert all(label == -100 for label in labels[:n])  # every prompt token masked
        assert labels[n:] == ids[n:]  # no completion token masked
        answer = tokenizer.decode(labels[n:])
        assert answer == raw["completion"][0]["content"] + "<|end|>\n<|endoftext|>"
        assert end in labels[n:]  # the end-of-turn token is trained
    # The collator pads labels with -100 and keeps them otherwise.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for i in range(3):
        labels = trainer.train_dataset[i]["labels"]
        assert batch["labels"][i, :len(labels)].tolist() == labels
        assert (batch["labels"][i, len(labels):] == -100).all()
        assert batch["attention_mask"][i].sum() == len(labels)


class KillAt(TrainerCallback):
    """Raise KeyboardInterrupt at the end of a step, as a kill or a lost Colab runtime would:
    nothing after the last checkpoint is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_model_dir, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    args = ["train.max_steps=6", "train.eval_steps=0"]
    for run in (full, broken):
        write_format(run, n_train=10)
    assert main(["train", *tiny_args(full, tiny_model_dir, *args)]) == 0

    # Killed at step 5: checkpoint-4 exists, step 5's work is lost.
    cfg = load_config(None, tiny_args(broken, tiny_model_dir, *args))
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_stage(cfg, callbacks=[KillAt(5)])
    paths = RunPaths(broken)
    assert not paths.adapter.exists() and (paths.checkpoints / "checkpoint-4").is_dir()
    assert main(["train", "--resume", *tiny_args(broken, tiny_model_dir, *args)]) == 0

    a = load_file(RunPaths(full).adapter / "adapter_model.safetensors")
    b = load_file(paths.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ra, rb = (json.loads(RunPaths(r).train_report.read_text()) for r in (full, broken))
    assert ra["steps"] == rb["steps"] == 6 and rb["resumed_from"].endswith("checkpoint-4")
    assert rb["tokens_seen"] == ra["tokens_seen"]
    # The log has each step once, and the resumed steps match the uninterrupted run.
    la, lb = ([json.loads(x) for x in RunPaths(r).train_log.read_text().splitlines()] for r in (full, broken))
    steps_b = [r["step"] for r in lb if r["loss"] is not None]
    assert steps_b == [1, 2, 3, 4, 5, 6]
    for x, y in zip(la, lb, strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5, nan_ok=True)


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    write_format(tmp_path)
    assert main(["train", "--resume", *tiny_args(tmp_path, tiny_model_dir)]) == 1
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "without --resume" in err and len(err.strip().splitlines()) == 1


def test_qlora_4bit_on_cpu_backend(tiny_model_dir, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    write_format(tmp_path, n_train=4)
    seen = spy_trainer(monkeypatch)
    assert main(["train", *tiny_args(tmp_path, tiny_model_dir, "model.load_in_4bit=true", "train.max_steps=2",
                                     "train.eval_steps=0")]) == 0
    model = seen[0].model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # On a CPU the LoRA weights train in float32 (TRL would leave them in bf16).
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    report = json.loads(RunPaths(tmp_path).train_report.read_text())
    assert report["load_in_4bit"] and report["steps"] == 2 and math.isfinite(report["final_train_loss"])


def test_merge_matches_base_plus_adapter(trained_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from prodtune import models
    from prodtune.config import ModelConfig

    run_dir, _ = trained_run
    assert main(["export", f"output_dir={run_dir}", f"model.name_or_path={tiny_model_dir}",
                 "train.device=cpu", "export.formats=merged"]) == 0
    paths = RunPaths(run_dir)
    assert list(paths.merged.glob("*.safetensors")) and (paths.merged / "chat_template.jinja").is_file()
    merged = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=torch.float32).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with_adapter = models.load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "cpu", adapter=paths.adapter)
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        expected, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4)
    # The merge is not a no-op: the adapter changed the base's outputs.
    base = models.load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "cpu")
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, got, atol=1e-4)


@pytest.mark.slow
def test_demo_model_trains_a_few_steps(tmp_path):
    """The real SmolLM2-135M (GGUF demo model) for 2 steps: its <|im_end|> is trained, loss finite."""
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    write_format(tmp_path, n_train=8, n_val=4)
    args = [f"output_dir={tmp_path}", "train.max_steps=2", "train.eval_steps=0", "train.save_steps=2",
            "train.batch_size=2", "train.max_eval_samples=2"]
    assert main(["train", "--config", str(config), *args]) == 0
    report = json.loads(RunPaths(tmp_path).train_report.read_text())
    assert report["steps"] == 2 and math.isfinite(report["final_train_loss"])
    assert set(report["lora_targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}

    from prodtune import models

    cfg = load_config(config, args)
    tokenizer = models.load_tokenizer(cfg.model, str(RunPaths(tmp_path).adapter))
    row = json.loads(RunPaths(tmp_path).split("train").read_text().splitlines()[0])
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert full.endswith(row["completion"][0]["content"] + "<|im_end|>\n")


@pytest.mark.gpu
def test_qlora_bf16_on_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """The plain QLoRA GPU path: 4-bit NF4 base, bf16 compute (fp16 on older cards), packing and
    checkpointing on, finite losses, merge."""
    import bitsandbytes as bnb

    write_format(tmp_path, n_train=8)
    seen = spy_trainer(monkeypatch)
    args = tiny_args(tmp_path, tiny_model_dir, "model.load_in_4bit=true", "train.device=cuda",
                     "train.optim=adamw_8bit", "train.max_steps=3", "train.speed=plain")
    assert main(["train", *args]) == 0
    model = seen[0].model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    report = json.loads(RunPaths(tmp_path).train_report.read_text())
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert report["device"] == "cuda" and report["precision"] == expected
    assert report["gradient_checkpointing"] and report["packing"]
    assert math.isfinite(report["final_train_loss"]) and math.isfinite(report["final_eval_loss"])
    assert report["peak_memory_kind"] == "cuda_max_allocated"
    assert main(["export", *args, "export.formats=merged"]) == 0


def gpu_host(monkeypatch, gib: float, processes: int) -> None:
    """Plan as one of `processes` ranks on a host of `gib`-GiB CUDA cards (no GPU needed)."""
    from prodtune import distributed, fast, models

    monkeypatch.setattr(models, "pick_device", lambda device: "cuda")
    monkeypatch.setattr(models, "compute_dtype", lambda cfg, device: torch.bfloat16)
    monkeypatch.setattr(plan_mod, "_device_for_plan", lambda device: "cuda")
    monkeypatch.setattr(fast, "read_card", lambda device: fast.Card(gib, (9, 0), True))
    monkeypatch.setattr(distributed, "world_size", lambda: processes)


@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("case, gib, overrides, packed", [
    ("fast", 141, {}, True),
    ("small", 15, {}, True),
    ("plain, packed (TRL's rows)", 80, {"speed": "plain"}, True),
    ("plain, unpacked", 80, {"speed": "plain", "packing": False}, False),
    ("cpu", None, {}, False),
])
def test_every_path_and_rank_count_takes_the_same_step(monkeypatch, processes, case, gib, overrides, packed):
    """train.step_tokens is the step everywhere: 16,384 tokens = 64 examples of 256 tokens, whether
    packed into 8 rows of 2048 or taken as 64 examples, on 1, 2 or 4 processes."""
    from prodtune import distributed
    from prodtune.config import ModelConfig, TrainConfig

    if gib is None:
        monkeypatch.setattr(distributed, "world_size", lambda: processes)
    else:
        gpu_host(monkeypatch, gib, processes)
    cfg = TrainConfig(step_tokens=16384, batch_size=4, device="cpu" if gib is None else "auto", **overrides)
    plan = train_mod.make_plan(cfg, ModelConfig(load_in_4bit=True), example_tokens=256.0)
    assert plan.packing == packed and plan.batch.processes == processes and plan.batch.kept
    assert plan.step_tokens == 16384 and plan.step_examples == pytest.approx(64)
    assert plan.batch.global_batch == (8 if packed else 64)  # rows of 2048, or examples
    assert plan.steps_per_epoch(8 * 10 if packed else 64 * 10) == 10
    text = plan.describe_step()
    assert "16,384 tokens" in text and "64.0 examples" in text
    if processes > 1:
        assert f"x {processes} processes" in text


def test_the_start_line_and_report_say_the_step(trained_run, tiny_model_dir):
    run_dir, _ = trained_run
    report = json.loads(RunPaths(run_dir).train_report.read_text())
    step = report["step"]
    # tiny_args: 330 tokens per step = 2 examples of ~165 tokens, batch 2 x 1; 16 examples.
    assert (step["unit"], step["examples"], step["per_device"], step["grad_accum"]) == ("examples", 2, 2, 1)
    assert step["configured_step_tokens"] == 330 and abs(step["tokens"] - 330) < step["example_tokens_mean"]
    assert step["optimizer_steps_per_epoch"] == 8 == round(report["steps"] / report["epochs"])
    assert report["first_step_s"] > 0 and report["model_load_s"] > 0
    assert report["tokens_per_s"] > 0 and report["tokens_per_s_overall"] > 0
    assert report["warmup_steps_left_out"] == 2 and report["speed"] == "plain"


def test_one_epoch_takes_the_steps_the_plan_printed(tiny_model_dir, tmp_path, capsys):
    write_format(tmp_path, n_train=12, n_val=0)
    assert main(["train", *tiny_args(tmp_path, tiny_model_dir, "train.max_steps=-1", "train.epochs=1",
                                     "train.step_tokens=660", "train.save_steps=100")]) == 0
    out = capsys.readouterr().out
    report = json.loads(RunPaths(tmp_path).train_report.read_text())
    assert report["steps"] == report["step"]["optimizer_steps_per_epoch"] == 3  # 12 examples, 4 per step
    assert "prodtune: path plain" in out
    assert "4.0 examples of ~" in out and "tokens per optimizer step" in out and "3 optimizer steps per epoch" in out


@pytest.mark.parametrize("step_tokens, processes, rows, accum, noted", [
    (16384, 4, 2, 1, True),    # the default step over 4 GPUs: micro-batches shrink, the plan says so
    (65536, 4, 8, 1, False),   # 64k tokens per step: every GPU keeps 8 rows
    (65536, 2, 8, 2, False),
    (65536, 1, 8, 4, False),
])
def test_plan_under_several_gpus_keeps_the_step_and_names_the_fix(monkeypatch, step_tokens, processes, rows,
                                                                  accum, noted):
    from prodtune.config import ModelConfig, TrainConfig

    gpu_host(monkeypatch, 80.0, processes)
    plan = train_mod.make_plan(TrainConfig(step_tokens=step_tokens), ModelConfig(load_in_4bit=True))
    assert (plan.speed, plan.speed_plan.rows, plan.speed_plan.grad_accum) == ("fast", rows, accum)
    assert plan.step_tokens == step_tokens
    assert bool(plan.note) == noted
    if noted:
        assert f"train.step_tokens={8 * 2048 * processes}" in plan.note


def test_a_step_that_is_not_whole_rows_is_rounded_and_said(monkeypatch):
    from prodtune.config import ModelConfig, TrainConfig

    gpu_host(monkeypatch, 80.0, 1)
    plan = train_mod.make_plan(TrainConfig(step_tokens=5000), ModelConfig(load_in_4bit=True))
    assert plan.step_tokens == 4096 and "not a whole number of 2048-token rows" in plan.note
