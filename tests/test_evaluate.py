"""The comparison stage: which items, the embedding model, and compare_stage end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from prodtune.config import EvalConfig, load_config
from prodtune.evaluate import compare_stage, resolve_embedding_model, select_items
from prodtune.io import RunPaths, write_jsonl
from tiny_run import make_run, product_rows


def test_embedding_model_resolution():
    assert resolve_embedding_model("") is None
    assert resolve_embedding_model("some/model") == "some/model"
    auto = resolve_embedding_model("auto")
    assert auto is not None and auto.endswith("model")


def test_select_items_is_seeded_subset_in_order():
    rows = [{"i": i} for i in range(50)]
    picked = select_items(rows, EvalConfig(max_samples=10, seed=1))
    assert len(picked) == 10 and picked == sorted(picked, key=lambda r: r["i"])
    assert picked == select_items(rows, EvalConfig(max_samples=10, seed=1))
    assert select_items(rows, EvalConfig(max_samples=None)) == rows


def test_compare_stage_end_to_end(tiny_model_dir, tmp_path):
    cfg = make_run(tmp_path, tiny_model_dir, n_items=6, embedding_model="auto")
    out = compare_stage(cfg)
    paths = RunPaths(tmp_path)
    metrics = json.loads(paths.metrics_json.read_text())
    assert set(metrics) == {"base", "tuned", "diff", "n"} and metrics["n"] == 6
    for name in ("rouge_l", "chrf", "bleu", "embedding_cosine", "stop_rate", "loss", "perplexity",
                 "length_words"):
        for key in ("base", "tuned", "diff"):
            entry = metrics[key][name]
            assert set(entry) == {"mean", "ci95"} and len(entry["ci95"]) == 2
    # the adapter changes the model, so the reference loss must differ between the two
    assert metrics["diff"]["loss"]["mean"] != 0
    table = pd.read_csv(paths.answers_csv)
    assert len(table) == 6
    assert {"question", "reference", "base_answer", "tuned_answer", "base_rouge_l", "tuned_chrf",
            "tuned_embedding_cosine"} <= set(table.columns)
    assert paths.report_md.is_file() and paths.report_html.is_file()
    assert str(paths.report_html) in out["summary"] and "ROUGE-L" in out["summary"]
    html = paths.report_html.read_text()
    assert "<script>alert(" not in html and html.count("<script") == 1  # titles hold a <script> payload
    assert (tmp_path / "config.yaml").is_file()


def test_compare_stage_on_an_empty_split_is_a_user_error(tiny_model_dir, tmp_path):
    from prodtune.errors import UserError

    cfg = make_run(tmp_path, tiny_model_dir, n_items=1)
    RunPaths(tmp_path).split("test").write_text("")
    with pytest.raises(UserError, match="no rows"):
        compare_stage(cfg)


def test_compare_on_the_validation_split_leaves_the_test_result_alone(tiny_model_dir, tmp_path):
    from prodtune.cli import main

    cfg = make_run(tmp_path, tiny_model_dir, n_items=4)
    paths = RunPaths(tmp_path)
    write_jsonl(paths.split("validation"), product_rows(3))
    compare_stage(cfg)
    test_metrics = paths.metrics_json.read_bytes()
    run_config = paths.config.read_bytes()
    trial = load_config(paths.config, ["eval.max_new_tokens=5"])
    out = compare_stage(trial, split="validation")
    val = RunPaths(tmp_path, "validation")
    assert json.loads(val.metrics_json.read_text())["n"] == 3 and val.report_html.is_file()
    assert paths.metrics_json.read_bytes() == test_metrics  # compare/ untouched
    assert "3 validation items" in out["summary"] and "held-out validation items" in val.report_md.read_text()
    assert "greedy, 5 new tokens at most" in val.report_md.read_text()
    # Settings tried on validation stay with that comparison, not in the run's config.
    assert paths.config.read_bytes() == run_config
    assert load_config(val.compare / "config.yaml").eval.max_new_tokens == 5
    with pytest.raises(Exception, match="choose test"):
        compare_stage(cfg, split="train")
    # Through the CLI, and not recorded as the pipeline's finished compare stage.
    marker = paths.compare / ".stage.json"
    assert main(["compare", "--config", str(paths.config), "--split", "validation"]) == 0
    assert not marker.exists()
    assert main(["compare", "--config", str(paths.config)]) == 0
    assert marker.exists()
