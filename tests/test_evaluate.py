"""Metrics on hand-made cases with known values, bootstrap intervals, and compare_stage end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from prodtune.config import EvalConfig, load_config
from prodtune.evaluate import (completion_tokens, compare_stage, corpus_statistic, item_scores,
                               mean_statistic, perplexity_statistic, resolve_embedding_model,
                               select_items, summarize)
from prodtune.io import RunPaths, write_jsonl
from tiny_run import make_run, product_rows

REF = "A colourful picture book about a cat and her kittens, for children aged three to six."


def test_identical_strings_score_perfectly():
    s = item_scores([REF], [REF])
    assert s["rouge_l"][0] == pytest.approx(1.0)
    assert s["chrf"][0] == pytest.approx(100.0)
    assert s["bleu"][0] == pytest.approx(100.0)


def test_disjoint_strings_score_zero():
    s = item_scores(["zzz qqq xxx"], ["abc def ghi"])
    assert s["rouge_l"][0] == 0 and s["chrf"][0] == 0 and s["bleu"][0] == 0
    assert item_scores([""], [REF])["chrf"][0] == 0  # an empty answer scores 0, no crash


def test_partial_overlap_is_between():
    s = item_scores(["a picture book about a cat"], [REF])
    assert 0 < s["rouge_l"][0] < 1 and 0 < s["chrf"][0] < 100


def test_corpus_statistic_matches_sacrebleu():
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "a dog ran"], ["the cat sat on a mat", "a dog ran home"]
    everything = np.arange(2)[None]
    assert corpus_statistic("bleu", hyps, refs)(everything)[0] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus_statistic("chrf", hyps, refs)(everything)[0] == pytest.approx(
        sacrebleu.corpus_chrf(hyps, [refs]).score)


def _summary(base, tuned, samples=500, seed=0):
    b, t = np.asarray(base, float), np.asarray(tuned, float)
    return summarize({"m": mean_statistic(b)}, {"m": mean_statistic(t)}, len(b), samples, seed)


def test_bootstrap_interval_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 500):
        x = rng.normal(5, 1, n)
        m = _summary(x, x + 1)["base"]["m"]
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
        assert m["mean"] == pytest.approx(x.mean())
        widths.append(m["ci95"][1] - m["ci95"][0])
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 5x narrower for 25x more items


def test_paired_difference_sign_and_pairing():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 10, 40)  # items differ a lot from each other...
    tuned = base + 0.5 + rng.normal(0, 0.1, 40)  # ...but tuned is a little better on every one
    s = _summary(base, tuned)
    lo, hi = s["diff"]["m"]["ci95"]
    assert s["diff"]["m"]["mean"] == pytest.approx(0.5, abs=0.05)
    assert 0 < lo < hi  # paired: clearly above zero although the two per-model intervals overlap
    assert s["base"]["m"]["ci95"][1] > s["tuned"]["m"]["ci95"][0]
    worse = _summary(tuned, base)["diff"]["m"]
    assert worse["ci95"][1] < 0 and worse["mean"] < 0


def test_bootstrap_is_seeded_and_shaped():
    a = _summary([1, 2, 3, 4], [2, 3, 4, 5], seed=3)
    assert a == _summary([1, 2, 3, 4], [2, 3, 4, 5], seed=3)
    assert set(a) == {"base", "tuned", "diff", "n"} and a["n"] == 4
    assert set(a["base"]["m"]) == {"mean", "ci95"}


def test_perplexity_is_exp_of_mean_loss():
    losses = np.array([1.0, 2.0, 3.0])
    assert perplexity_statistic(losses)(np.arange(3)[None])[0] == pytest.approx(np.exp(2.0))


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


def test_completion_mask_matches_training(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = product_rows(1)[0]
    ids, start = completion_tokens(tok, row["prompt"], row["completion"], max_length=2048)
    prompt_ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert ids[:start] == list(prompt_ids)
    answer = tok.decode(ids[start:])
    assert answer.startswith(row["completion"][0]["content"]) and "<|end|>" in answer  # end-of-turn scored
    assert completion_tokens(tok, row["prompt"], row["completion"], max_length=10)[0] == ids[:10]


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
