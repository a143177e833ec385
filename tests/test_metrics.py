"""Metrics on hand-made cases with known values, bootstrap intervals, verdicts and their wording."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from prodtune.metrics import (corpus_statistic, fmt, fmt_interval, item_scores, mean_statistic,
                              perplexity_statistic, summarize, verdict)

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


def test_verdict_follows_the_interval_and_direction():
    assert verdict("rouge_l", {"mean": 0.1, "ci95": [0.05, 0.2]}) == "better"
    assert verdict("rouge_l", {"mean": 0.1, "ci95": [-0.05, 0.2]}) == "same"
    assert verdict("loss", {"mean": -0.3, "ci95": [-0.5, -0.1]}) == "better"
    assert verdict("loss", {"mean": 0.3, "ci95": [0.1, 0.5]}) == "worse"
    assert verdict("perplexity", {"mean": -2.0, "ci95": [-3.0, -1.0]}) == "better"
    assert verdict("chrf", {"mean": -2.0, "ci95": [-3.0, -1.0]}) == "worse"
    assert verdict("loss", {"mean": 0.0, "ci95": [0.0, 0.4]}) == "same"  # zero inside: no clear difference
    # no direction: a clear change is said as one, not as better or worse
    assert verdict("length_words", {"mean": 9.0, "ci95": [5.0, 12.0]}) == "higher"
    assert verdict("length_words", {"mean": -9.0, "ci95": [-12.0, -5.0]}) == "lower"
    assert verdict("length_words", {"mean": 1.0, "ci95": [-2.0, 3.0]}) == "same"
    assert verdict("rouge_l", {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}) == "same"


@pytest.mark.parametrize("x, shown", [(0.12345, "0.123"), (12.345, "12.35"), (123.45, "123.5"),
                                      (float("nan"), "–"), (None, "–")])
def test_fmt(x, shown):
    assert fmt(x) == shown


def test_fmt_interval_signs_differences_only():
    entry = {"mean": -0.56, "ci95": [-0.77, 0.012]}
    assert fmt_interval(entry) == "-0.560 [-0.770, 0.012]"
    assert fmt_interval(entry, signed=True) == "-0.560 [-0.770, +0.012]"
    assert fmt_interval({"mean": 25.34, "ci95": [0.0, 101.0]}, signed=True) == "+25.34 [+0.000, +101.0]"
    assert fmt(-0.0, signed=True) == "-0.000" and fmt(float("nan"), signed=True) == "–"


def test_metrics_load_no_model_and_no_stage():
    # The reports and notebooks import metrics; it must not drag in torch or the comparison stage.
    code = ("import sys, prodtune.metrics, prodtune.report; "
            "print(sorted(m for m in ('torch', 'transformers', 'prodtune.evaluate', 'prodtune.generate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

