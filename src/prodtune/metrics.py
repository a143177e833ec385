"""The comparison's numbers: per-item text metrics, bootstrap intervals, verdicts and their wording.

Pure code on answers, references and per-item scores; nothing here loads a model, so the stage
(evaluate.py), the reports (report.py) and the notebooks can all use it.

    scores = score_model(answers, stopped, losses, references)          # per item
    metrics = summarize(statistics(base, ...), statistics(tuned, ...), n, samples=1000, seed=0)
    verdict("loss", metrics["diff"]["loss"])                            # 'better' | 'worse' | 'same' ...
    fmt_interval(metrics["diff"]["loss"], signed=True)                  # '-0.560 [-0.770, -0.410]'

Every metric gets a 95% percentile-bootstrap interval, and so does the paired difference
tuned - base: both models' scores are resampled with the same item indices, which is what
makes small differences measurable on a few dozen items.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from prodtune.errors import UserError

# metric name -> what the report says about it. Order is the report's order.
METRICS: dict[str, str] = {
    "rouge_l": "ROUGE-L F-measure (0-1), longest common subsequence of words",
    "chrf": "chrF (0-100), character n-gram F-score",
    "bleu": "sentence BLEU (0-100, exp smoothing), averaged over items",
    "embedding_cosine": "cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default)",
    "loss": "mean cross-entropy of the reference answer's tokens (lower is better)",
    "perplexity": "exp(mean loss) of the reference answers (lower is better)",
    "length_words": "answer length in words",
    "stop_rate": "share of answers that ended on end-of-turn rather than at max_new_tokens",
    "bleu_corpus": "corpus BLEU over all items (0-100)",
    "chrf_corpus": "corpus chrF over all items (0-100)",
}
LOWER_IS_BETTER = {"loss", "perplexity"}
NO_DIRECTION = {"length_words"}  # longer is neither better nor worse

Verdict = Literal["better", "worse", "same", "higher", "lower"]

# A statistic maps bootstrap indices (B, n) to B values; np.arange(n)[None] gives the point value.
Statistic = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- per item

def item_scores(answers: list[str], references: list[str]) -> dict[str, np.ndarray]:
    """ROUGE-L, chrF and BLEU of each answer against its reference."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bleu = BLEU(effective_order=True)  # what sacrebleu.sentence_bleu uses for single sentences
    chrf = CHRF()
    scores: dict[str, list[float]] = {"rouge_l": [], "chrf": [], "bleu": []}
    for hyp, ref in zip(answers, references, strict=True):
        scores["rouge_l"].append(rouge.score(ref, hyp)["rougeL"].fmeasure)
        scores["chrf"].append(chrf.sentence_score(hyp, [ref]).score)
        scores["bleu"].append(bleu.sentence_score(hyp, [ref]).score)
    return {k: np.asarray(v, dtype=float) for k, v in scores.items()}


def score_model(answers: list[str], stopped: list[bool], losses: np.ndarray,
                references: list[str]) -> dict[str, np.ndarray]:
    """Per-item scores of one model (embedding cosine is added separately)."""
    scores = item_scores(answers, references)
    scores["loss"] = np.asarray(losses, dtype=float)
    scores["perplexity"] = np.exp(scores["loss"])
    scores["length_words"] = np.array([len(a.split()) for a in answers], dtype=float)
    scores["stop_rate"] = np.asarray(stopped, dtype=float)
    return scores


# ----------------------------------------------------------------------------- statistics

def mean_statistic(values: np.ndarray) -> Statistic:
    """The mean over resampled items (NaN items ignored)."""
    values = np.asarray(values, dtype=float)
    return lambda idx: np.nanmean(values[idx], axis=1)


def perplexity_statistic(losses: np.ndarray) -> Statistic:
    """exp of the mean loss over resampled items: the perplexity of the whole set, not a mean of ratios."""
    mean = mean_statistic(losses)
    return lambda idx: np.exp(mean(idx))


def corpus_statistic(name: str, answers: list[str], references: list[str]) -> Statistic:
    """Corpus BLEU or chrF over resampled items, from per-sentence sufficient statistics.

    Corpus scores are not means of sentence scores; summing each sentence's n-gram counts over the
    resampled items and scoring the sums is how sacrebleu's own paired bootstrap does it (the
    two methods used are sacrebleu internals, stable since 2.0).
    """
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU() if name == "bleu" else CHRF()
    stats = np.asarray(metric._extract_corpus_statistics(answers, [references]), dtype=np.int64)
    return lambda idx: np.array([metric._compute_score_from_stats(stats[row].sum(0).tolist()).score
                                 for row in idx])


def statistics(scores: dict[str, np.ndarray], answers: list[str], references: list[str]) -> dict[str, Statistic]:
    """One bootstrap statistic per reported metric, in METRICS order."""
    stats: dict[str, Statistic] = {}
    for name in METRICS:
        if name == "perplexity":
            stats[name] = perplexity_statistic(scores["loss"])
        elif name in ("bleu_corpus", "chrf_corpus"):
            stats[name] = corpus_statistic(name.split("_")[0], answers, references)
        elif name in scores:
            stats[name] = mean_statistic(scores[name])
    return stats


# ----------------------------------------------------------------------------- bootstrap

def ci95(samples: np.ndarray) -> list[float]:
    """The 2.5 and 97.5 percentiles of bootstrap samples."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) item indices drawn with replacement; the same rows serve every metric and model."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def summarize(base: dict[str, Statistic], tuned: dict[str, Statistic], n: int,
              samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metrics.json: point value and 95% interval per model, and of the paired difference tuned - base."""
    if n < 1:
        raise UserError("no test items to compare: format/test.jsonl is empty (raise data.test_fraction)")
    idx = bootstrap_indices(n, samples, seed)
    everything = np.arange(n)[None]
    out: dict[str, Any] = {"base": {}, "tuned": {}, "diff": {}, "n": n}
    for name in base:
        b_point, t_point = float(base[name](everything)[0]), float(tuned[name](everything)[0])
        b_boot, t_boot = base[name](idx), tuned[name](idx)
        out["base"][name] = {"mean": b_point, "ci95": ci95(b_boot)}
        out["tuned"][name] = {"mean": t_point, "ci95": ci95(t_boot)}
        out["diff"][name] = {"mean": t_point - b_point, "ci95": ci95(t_boot - b_boot)}
    return out


# ----------------------------------------------------------------------------- reading the numbers

def verdict(name: str, diff: dict[str, Any]) -> Verdict:
    """'better' or 'worse' for the tuned model, from where the diff's interval lies; 'same' when it holds zero.

    'same' also when there is no interval. A metric without a direction (answer length) that
    clearly changed is 'higher' or 'lower': a change, not a judgement.
    """
    lo, hi = diff["ci95"]
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "same"
    up = lo > 0  # the whole interval lies above zero: tuned scored higher
    if name in NO_DIRECTION:
        return "higher" if up else "lower"
    return "better" if up != (name in LOWER_IS_BETTER) else "worse"


def fmt(x: float | None, signed: bool = False) -> str:
    """A metric value: 3 decimals below 10, 2 below 100, 1 above; NaN or None as an en dash."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    a = abs(x)
    text = f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 10 else f"{x:.3f}"
    return "+" + text if signed and not text.startswith("-") else text


def fmt_interval(entry: dict[str, Any], signed: bool = False) -> str:
    """'mean [lo, hi]' of a metrics.json entry; signed=True (for differences) puts a sign on all three."""
    lo, hi = entry["ci95"]
    return f"{fmt(entry['mean'], signed)} [{fmt(lo, signed)}, {fmt(hi, signed)}]"
