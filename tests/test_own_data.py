"""Your own data end to end: clean -> format -> a 2-step train -> compare on the tiny model, for the
same products as CSV, parquet and gzip CSV (with context columns) and as chat conversations."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from prodtune import generate as generate_mod
from prodtune.cli import main
from prodtune.config import load_config
from prodtune.io import RunPaths, read_json, read_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
SHOP = ["data.title_field=product_name", "data.content_field=description", "data.id_field=product_id",
        "data.context_fields=brand,category"]


def run_args(run_dir: Path, model_dir: Path, raw: Path, *mapping: str) -> list[str]:
    return [f"output_dir={run_dir}", f"data.raw_path={raw}", *mapping, "data.test_fraction=0.2",
            f"model.name_or_path={model_dir}", "model.dtype=float32", "train.device=cpu", "train.max_steps=2",
            "train.batch_size=2", "train.step_tokens=330", "train.eval_steps=1", "train.save_steps=2",
            "train.optim=adamw_torch", "train.packing=false", "train.max_length=256", "train.max_eval_samples=4",
            "train.report_to=none", "eval.max_samples=5", "eval.max_new_tokens=6", "eval.embedding_model=",
            "eval.bootstrap_samples=50"]


@pytest.mark.parametrize("name, mapping", [("products.csv", SHOP), ("products.parquet", SHOP),
                                           ("products.csv.gz", SHOP), ("chat.jsonl", [])])
def test_clean_format_train_compare(tmp_path, tiny_model_dir, capsys, name, mapping):
    run = RunPaths(tmp_path / "run")
    assert main(["run", *run_args(run.root, tiny_model_dir, FIXTURES / name, *mapping)]) == 0
    assert "ROUGE-L" in capsys.readouterr().out
    clean = read_json(run.clean_report)
    fmt = read_json(run.format_report)
    assert clean["rows_read"] == 120 and fmt["rows"] == clean["rows_kept"]
    train = read_json(run.train_report)
    assert train["steps"] == 2 and train["final_train_loss"] is not None
    answers = pd.read_csv(run.answers_csv, keep_default_na=False)
    test_rows = {r["uid"]: r for r in read_jsonl(run.split("test"))}
    assert len(answers) == 5 and read_json(run.metrics_json)["n"] == 5
    for _, item in answers.iterrows():
        row = test_rows[item["uid"]]
        assert item["reference"] == row["completion"][-1]["content"] and item["title"] == row["title"]
    if name == "chat.jsonl":
        assert clean["mapping"]["kind"] == fmt["kind"] == "chat" and clean["dropped"]["no_answer"] == 1
        for item in answers.itertuples():  # the title is the first user message, cut for the table
            first_user = next(m["content"] for m in test_rows[item.uid]["prompt"] if m["role"] == "user")
            assert first_user.startswith(item.title.rstrip("…"))
    else:
        assert fmt["context_fields"]["category"]["rows"] == fmt["rows"]
        assert 0 < fmt["context_fields"]["brand"]["rows"] < fmt["rows"]
        assert all("Category: " in r["prompt"][-1]["content"].split("\n\n", 1)[1] for r in test_rows.values())


def test_ask_with_context_prompts_like_training(tmp_path, tiny_model_dir, monkeypatch, capsys):
    run = RunPaths(tmp_path / "run")
    assert main(["run", *run_args(run.root, tiny_model_dir, FIXTURES / "products.csv", *SHOP)]) == 0
    trained = next(r for s in ("train", "validation", "test") for r in read_jsonl(run.split(s))
                   if "\nBrand: " in r["prompt"][-1]["content"])
    question, lines = trained["prompt"][-1]["content"].split("\n\n")
    context = dict(line.split(": ", 1) for line in lines.split("\n"))
    seen = []
    real = generate_mod.generate

    def spy(model, tokenizer, prompts, eval_cfg, desc="generate"):
        seen.append(prompts)
        return real(model, tokenizer, prompts, eval_cfg, desc)

    monkeypatch.setattr(generate_mod, "generate", spy)
    argv = ["ask", question, "--run", str(run.root), "--max-new-tokens", "3",
            "--context", f"category={context['Category']}", "--context", f"brand={context['Brand']}"]
    assert main(argv) == 0
    assert seen[-1] == [trained["prompt"]]  # the same prompt, the context in the training's order
    capsys.readouterr()
    assert main(["ask", question, "--run", str(run.root), "--context", "colour=red"]) == 1
    assert "this run's context fields are brand, category" in capsys.readouterr().err
    assert main(["ask", question, "--run", str(run.root), "--context", "brand"]) == 1
    assert "write FIELD=VALUE" in capsys.readouterr().err


def test_the_mapping_reaches_the_clean_report_and_the_saved_config(tmp_path, capsys):
    run = RunPaths(tmp_path / "run")
    assert main(["clean", f"output_dir={run.root}", f"data.raw_path={FIXTURES / 'products.parquet'}", *SHOP]) == 0
    out = capsys.readouterr().out
    assert "products.parquet (parquet, 120 rows in 3 row groups)" in out
    assert load_config(run.config).data.context_fields == ["brand", "category"]
    assert read_json(run.clean_report)["context_rows"]["category"] == 85
