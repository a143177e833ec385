"""Stage 2 (format): templates, seeded sampling, leakage-proof splits, the report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from prodtune.config import DEFAULT_QUESTION_TEMPLATES, load_config
from prodtune.errors import UserError
from prodtune.io import RunPaths, read_json, read_jsonl
from prodtune.prompts import (SPLITS, as_question, ask_prompt, assign_splits, build_prompt, context_label,
                              format_stage, normalize_title, pick_templates, sample_indices, tokenize_as_trl)

# Near-duplicates of one title: case, whitespace, punctuation, curly quote, full-width letters.
NEAR_DUPLICATES = ["Mog's Kittens", "mog's  kittens", "MOG'S KITTENS!", "Mog’s Kittens",
                   "  Mog's\tKittens  ", "Ｍｏｇ's Kittens", "Mogs-Kittens"]


def write_clean(run_dir: Path, n: int = 300, extra: list[tuple[str, str]] = ()) -> Path:
    """A clean.parquet like the clean stage writes: n distinct titles plus extra (title, content) rows."""
    rows = [{"uid": f"u{i:04d}", "title": f"Product number {i}",
             "content": f"Content of product {i}. " * (1 + i % 5)} for i in range(n)]
    rows += [{"uid": f"x{i:04d}", "title": t, "content": c} for i, (t, c) in enumerate(extra)]
    path = RunPaths(run_dir).clean_parquet
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def cfg_for(run_dir: Path, *overrides: str):
    return load_config(None, [f"output_dir={run_dir}", "data.count_tokens=false", *overrides])


def all_rows(run_dir: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(RunPaths(run_dir).split(s)) for s in SPLITS}


# ----------------------------------------------------------------------------- prompts and templates

def test_build_prompt_system_message_optional():
    assert build_prompt("Q?", "Be nice.") == [{"role": "system", "content": "Be nice."},
                                              {"role": "user", "content": "Q?"}]
    assert build_prompt("Q?", "") == [{"role": "user", "content": "Q?"}]


def test_as_question_wraps_bare_titles_only():
    assert as_question("Mog's Kittens", DEFAULT_QUESTION_TEMPLATES) == "Describe the product 'Mog's Kittens'."
    assert as_question("What is a tutu?", DEFAULT_QUESTION_TEMPLATES) == "What is a tutu?"


def test_at_least_five_templates_ship_each_with_placeholder():
    assert len(DEFAULT_QUESTION_TEMPLATES) >= 5
    assert len(set(DEFAULT_QUESTION_TEMPLATES)) == len(DEFAULT_QUESTION_TEMPLATES)
    assert all("{title}" in t for t in DEFAULT_QUESTION_TEMPLATES)


def test_template_picks_seeded():
    a = pick_templates(200, 7, seed=1)
    assert (a == pick_templates(200, 7, seed=1)).all()
    assert not (a == pick_templates(200, 7, seed=2)).all()
    assert set(a.tolist()) == set(range(7))


def test_every_template_used_and_filled(tmp_path):
    write_clean(tmp_path, n=300)
    report = format_stage(cfg_for(tmp_path))
    assert set(report["template_usage"]) == set(DEFAULT_QUESTION_TEMPLATES)
    assert all(n > 0 for n in report["template_usage"].values())
    assert sum(report["template_usage"].values()) == 300
    questions = Counter()
    for rows in all_rows(tmp_path).values():
        for row in rows:
            question = row["prompt"][-1]["content"]
            assert "{title}" not in question and row["title"] in question
            questions[question.replace(row["title"], "{title}")] += 1
    assert set(questions) == set(DEFAULT_QUESTION_TEMPLATES)


def test_rows_follow_the_contract(tmp_path):
    write_clean(tmp_path, n=50)
    format_stage(cfg_for(tmp_path, "data.system_prompt=Be brief."))
    row = all_rows(tmp_path)["train"][0]
    assert set(row) == {"prompt", "completion", "title", "uid"}
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert row["prompt"][1]["role"] == "user"
    assert row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"]
    # An empty system prompt drops the system message.
    format_stage(cfg_for(tmp_path, "data.system_prompt=''"))
    assert [m["role"] for m in all_rows(tmp_path)["train"][0]["prompt"]] == ["user"]


def test_same_seed_same_output_different_seed_differs(tmp_path):
    write_clean(tmp_path / "a", n=120)
    write_clean(tmp_path / "b", n=120)
    write_clean(tmp_path / "c", n=120)
    format_stage(cfg_for(tmp_path / "a", "data.seed=5"))
    format_stage(cfg_for(tmp_path / "b", "data.seed=5"))
    format_stage(cfg_for(tmp_path / "c", "data.seed=6"))
    a, b, c = (all_rows(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c


# ----------------------------------------------------------------------------- sampling

def test_sample_is_random_not_first_n(tmp_path):
    write_clean(tmp_path, n=300)
    report = format_stage(cfg_for(tmp_path, "data.sample_size=60"))
    uids = sorted(r["uid"] for rows in all_rows(tmp_path).values() for r in rows)
    assert report["rows"] == len(uids) == 60 and len(set(uids)) == 60
    assert uids != [f"u{i:04d}" for i in range(60)]
    assert max(int(u[1:]) for u in uids) > 200   # drawn from the whole table


def test_sample_indices_seeded():
    a = sample_indices(1000, 50, seed=3)
    assert (a == sample_indices(1000, 50, seed=3)).all()
    assert set(a.tolist()) != set(sample_indices(1000, 50, seed=4).tolist())
    assert len(sample_indices(10, 50, seed=3)) == 10      # a sample bigger than the table is all rows
    assert len(sample_indices(10, None, seed=3)) == 10


# ----------------------------------------------------------------------------- splits

def test_normalize_title_groups_near_duplicates():
    assert {normalize_title(t) for t in NEAR_DUPLICATES} == {"mogskittens"}
    assert normalize_title("Mog's Kittens") != normalize_title("Mog's Puppies")
    assert normalize_title("!!!") == "!!!"   # nothing alphanumeric: keep the text, never ''


def test_no_normalised_title_shared_across_splits(tmp_path):
    extra = [(t, f"A book about Mog, copy {i}.") for i, t in enumerate(NEAR_DUPLICATES)]
    extra += [(f"{t} Vol. 2", "Another.") for t in ("Harry Potter", "harry potter", "HARRY-POTTER")]
    write_clean(tmp_path, n=400, extra=extra)
    report = format_stage(cfg_for(tmp_path, "data.val_fraction=0.2", "data.test_fraction=0.2"))
    keys = {s: {normalize_title(r["title"]) for r in rows} for s, rows in all_rows(tmp_path).items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # All seven Mog rows went to one split.
    mog = [s for s, rows in all_rows(tmp_path).items() for r in rows if normalize_title(r["title"]) == "mogskittens"]
    assert len(mog) == len(NEAR_DUPLICATES) and len(set(mog)) == 1
    assert sum(f["rows"] for f in report["splits"].values()) == 400 + len(extra)


def test_split_fractions_roughly_achieved():
    titles = [f"title {i}" for i in range(5000)]
    splits, moves = assign_splits(titles, 0.1, 0.2, seed=1)
    share = Counter(splits)
    assert moves == []
    assert abs(share["validation"] / 5000 - 0.1) < 0.02
    assert abs(share["test"] / 5000 - 0.2) < 0.02


def test_adding_rows_does_not_reshuffle_existing_titles():
    titles = [f"title {i}" for i in range(300)]
    before, _ = assign_splits(titles, 0.1, 0.1, seed=7)
    after, _ = assign_splits(titles + [f"new title {i}" for i in range(300)], 0.1, 0.1, seed=7)
    assert after[:300] == before


def test_small_data_still_gets_validation_and_test():
    splits, moves = assign_splits(["Alpha", "Beta", "Gamma"], 0.01, 0.01, seed=0)
    assert sorted(splits) == ["test", "train", "validation"]
    assert moves
    # Near-duplicates count as one title: two distinct titles cannot fill three splits.
    splits, _ = assign_splits(["Alpha", "ALPHA", "Beta"], 0.01, 0.01, seed=0)
    assert splits[0] == splits[1]
    # A fraction of 0 means no such split.
    splits, _ = assign_splits([f"t{i}" for i in range(20)], 0.0, 0.2, seed=0)
    assert "validation" not in splits and "test" in splits


def test_guarantee_holds_for_many_seeds():
    for seed in range(50):
        splits, _ = assign_splits([f"t{i}" for i in range(4)], 0.05, 0.05, seed=seed)
        assert set(splits) == {"train", "validation", "test"}, seed


# ----------------------------------------------------------------------------- report

def test_report_counts_and_lengths(tmp_path):
    write_clean(tmp_path, n=200, extra=[("Mog's Kittens", "Cat."), ("MOG'S KITTENS", "Cat again.")])
    report = format_stage(cfg_for(tmp_path, "data.val_fraction=0.1", "data.test_fraction=0.1"))
    assert report == read_json(RunPaths(tmp_path).format_report)
    rows = all_rows(tmp_path)
    for split in SPLITS:
        facts = report["splits"][split]
        assert facts["rows"] == len(rows[split]) > 0
        assert facts["titles"] == len({normalize_title(r["title"]) for r in rows[split]})
        assert facts["row_fraction"] == pytest.approx(len(rows[split]) / 202, abs=1e-4)
    assert report["clean_rows"] == report["rows"] == 202
    assert report["target_fractions"] == {"validation": 0.1, "test": 0.1}
    chars = report["lengths"]["chars"]
    assert set(chars["completion"]) == {"min", "median", "mean", "p95", "max"}
    assert chars["completion"]["min"] == len("Cat.")
    assert chars["completion"]["min"] <= chars["completion"]["median"] <= chars["completion"]["max"]
    assert report["lengths"]["tokens"] is None and "count_tokens" in report["lengths"]["tokens_skipped"]
    for split in SPLITS:
        assert str(RunPaths(tmp_path).split(split)) in report["summary"]
    # No temporary files left behind.
    assert sorted(p.name for p in RunPaths(tmp_path).format.iterdir()) == [
        "format_report.json", "test.jsonl", "train.jsonl", "validation.jsonl"]


def test_other_files_in_format_folder_are_kept(tmp_path):
    # The pipeline keeps its .stage.json record in format/; rewriting the splits must not drop it.
    write_clean(tmp_path, n=20)
    marker = RunPaths(tmp_path).format / ".stage.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    format_stage(cfg_for(tmp_path))
    assert marker.read_text() == "{}"


def test_tokenize_as_trl_masks_the_prompt_as_training_does(tiny_model_dir):
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize, common_prefix_length
    from tiny_run import product_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = product_rows(5)
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    got = list(tokenize_as_trl(tok, prompts, completions, batch=2))  # batches of 2, 2 and 1
    assert got == list(tokenize_as_trl(tok, prompts, completions))
    for (ids, start), row in zip(got, rows):
        # what TRL's SFTTrainer computes, row by row, for a conversational prompt-completion row
        prompt_ids = _tokenize(tok, row["prompt"], add_generation_prompt=True)["input_ids"]
        full = _tokenize(tok, row["prompt"] + row["completion"])["input_ids"]
        assert (ids, start) == (list(full), common_prefix_length(prompt_ids, full))
        assert ids[:start] == list(prompt_ids)
        answer = tok.decode(ids[start:])
        assert answer.startswith(row["completion"][0]["content"]) and "<|end|>" in answer  # end-of-turn scored
    cut = list(tokenize_as_trl(tok, prompts[:1], completions[:1], max_length=10))
    assert cut == [(got[0][0][:10], got[0][1])]  # cut from the right; the completion still starts there


def test_tokenize_as_trl_when_the_prompt_renders_differently_alone(tiny_model_dir):
    from transformers import AutoTokenizer

    from tiny import PHI3_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Like Gemma's empty thought block: the generation prompt adds text the full conversation lacks.
    tok.chat_template = PHI3_CHAT_TEMPLATE.replace("'<|assistant|>\n' }}", "'<|assistant|>\n<|system|>' }}")
    prompt, completion = build_prompt("Describe 'Mog'."), [{"role": "assistant", "content": "A cat book."}]
    assert tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False).endswith("<|system|>")
    [(ids, start)] = tokenize_as_trl(tok, [prompt], [completion])
    assert tok.decode(ids[start:]).startswith("A cat book.")  # starts where the two diverge


def test_token_stats_with_tiny_tokenizer(tmp_path, tiny_model_dir):
    write_clean(tmp_path, n=40)
    report = format_stage(load_config(None, [f"output_dir={tmp_path}", "data.count_tokens=true",
                                             f"model.name_or_path={tiny_model_dir}", "train.max_length=20"]))
    tokens = report["lengths"]["tokens"]
    assert tokens is not None, report["lengths"].get("tokens_skipped")
    for part in ("prompt", "completion", "total"):
        assert 0 < tokens[part]["min"] <= tokens[part]["median"] <= tokens[part]["max"]
    assert tokens["total"]["max"] <= tokens["prompt"]["max"] + tokens["completion"]["max"]
    assert tokens["rows_counted"] == 40
    assert tokens["over_train_max_length"] == 40       # every example is longer than 20 tokens
    assert tokens["share_over_train_max_length"] == 1.0
    assert "tokens per example" in report["summary"]


def test_token_stats_on_a_capped_sample(tmp_path, tiny_model_dir):
    write_clean(tmp_path, n=40)
    overrides = [f"output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "data.token_stats_rows=10"]
    report = format_stage(load_config(None, overrides))
    assert report["lengths"]["tokens"]["rows_counted"] == 10
    with pytest.raises(UserError, match="token_stats_rows"):
        format_stage(load_config(None, [*overrides, "data.token_stats_rows=0"]))


def test_unloadable_tokenizer_is_recorded_not_fatal(tmp_path):
    write_clean(tmp_path, n=30)
    report = format_stage(load_config(None, [f"output_dir={tmp_path}", "data.count_tokens=true",
                                             f"model.name_or_path={tmp_path / 'no-such-model'}"]))
    assert report["lengths"]["tokens"] is None
    assert "no-such-model" in report["lengths"]["tokens_skipped"]
    assert report["rows"] == 30


def test_config_saved_into_run_folder(tmp_path):
    from prodtune.stages import run_stage

    write_clean(tmp_path, n=20)
    run_stage(cfg_for(tmp_path, "data.seed=11"), "format")
    assert "seed: 11" in RunPaths(tmp_path).config.read_text()


# ----------------------------------------------------------------------------- bad input

def test_missing_clean_parquet_says_run_clean(tmp_path):
    with pytest.raises(UserError, match="prodtune clean"):
        format_stage(cfg_for(tmp_path))
    assert not RunPaths(tmp_path).format.exists()


def test_clean_parquet_without_rows_or_columns(tmp_path):
    path = RunPaths(tmp_path).clean_parquet
    path.parent.mkdir(parents=True)
    pd.DataFrame({"uid": pd.Series([], dtype=str), "title": pd.Series([], dtype=str),
                  "content": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(UserError, match="no rows"):
        format_stage(cfg_for(tmp_path))
    pd.DataFrame({"uid": ["a"], "title": ["b"]}).to_parquet(path)
    with pytest.raises(UserError, match="content"):
        format_stage(cfg_for(tmp_path))
    path.write_text("not parquet")
    with pytest.raises(UserError, match="parquet"):
        format_stage(cfg_for(tmp_path))


def test_failed_run_keeps_previous_outputs(tmp_path, monkeypatch):
    write_clean(tmp_path, n=30)
    format_stage(cfg_for(tmp_path))
    before = {s: RunPaths(tmp_path).split(s).read_text() for s in SPLITS}

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("prodtune.prompts.write_json", boom)
    with pytest.raises(RuntimeError):
        format_stage(cfg_for(tmp_path, "data.seed=99"))
    assert {s: RunPaths(tmp_path).split(s).read_text() for s in SPLITS} == before
    assert json.loads(RunPaths(tmp_path).format_report.read_text())["seed"] == 3407


# ----------------------------------------------------------------------------- context fields

def test_context_lines_follow_the_question_labelled_and_in_order():
    prompt = build_prompt("Describe 'Mug'.", "", {"brand": "Acme", "unit_price": "12.5", "colour": None})
    assert prompt == [{"role": "user", "content": "Describe 'Mug'.\n\nBrand: Acme\nUnit price: 12.5"}]
    assert build_prompt("Q?", "", {"brand": None}) == build_prompt("Q?", "")
    assert context_label("product-line") == "Product line"


def write_clean_with_context(run_dir: Path, n: int = 80) -> None:
    rows = [{"uid": f"u{i}", "title": f"Product number {i}", "content": f"Content of product {i}. " * 3,
             "brand": "Acme" if i % 4 == 0 else None, "category": ["Toys", "Books"][i % 2]} for i in range(n)]
    path = RunPaths(run_dir).clean_parquet
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)


def test_format_puts_context_in_the_prompt_and_counts_it(tmp_path):
    write_clean_with_context(tmp_path)
    report = format_stage(cfg_for(tmp_path))
    assert report["context_fields"] == {"brand": {"rows": 20, "share": 0.25}, "category": {"rows": 80, "share": 1.0}}
    assert "context in the prompt: brand (20 rows, 25%), category (80 rows, 100%)" in report["summary"]
    rows = {r["uid"]: r for s in all_rows(tmp_path).values() for r in s}
    assert rows["u0"]["prompt"][-1]["content"].endswith("\n\nBrand: Acme\nCategory: Toys")
    assert rows["u1"]["prompt"][-1]["content"].endswith("'.\n\nCategory: Books")
    assert rows["u0"]["title"] == "Product number 0"


def test_ask_prompt_builds_what_training_built(tmp_path):
    write_clean_with_context(tmp_path)
    format_stage(cfg_for(tmp_path))
    cfg = cfg_for(tmp_path)
    trained = next(r for s in all_rows(tmp_path).values() for r in s if r["uid"] == "u0")
    question = trained["prompt"][-1]["content"].split("\n\n")[0]
    # Given in another order, the context comes out in the training's order.
    asked = ask_prompt(question, cfg.data, RunPaths(tmp_path).clean_parquet, {"category": "Toys", "brand": "Acme"})
    assert asked == trained["prompt"]
    with pytest.raises(UserError, match="--context colour: this run's context fields are brand, category"):
        ask_prompt("Mug", cfg.data, RunPaths(tmp_path).clean_parquet, {"colour": "red"})


def test_ask_prompt_for_a_run_without_context_or_on_conversations(tmp_path):
    write_clean(tmp_path, n=10)
    cfg = cfg_for(tmp_path)
    with pytest.raises(UserError, match="context fields are none \\(it was trained on titles alone\\)"):
        ask_prompt("Mug", cfg.data, RunPaths(tmp_path).clean_parquet, {"brand": "Acme"})
    chat = [{"uid": "c1", "title": "Hi?", "content": "Hello.",
             "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    pd.DataFrame(chat).to_parquet(RunPaths(tmp_path).clean_parquet)
    asked = ask_prompt("Mog's Kittens", cfg.data, RunPaths(tmp_path).clean_parquet)
    assert asked[-1] == {"role": "user", "content": "Mog's Kittens"}  # no product template for a chat run
