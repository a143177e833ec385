"""Stage 2 (format): clean rows -> TRL conversational prompt-completion JSONL splits.

    report = format_stage(cfg)   # clean/clean.parquet -> format/{train,validation,test}.jsonl

`build_prompt` is the one place a prompt is built; training, comparison and `prodtune ask` all
call it, so training and inference prompts cannot diverge. A product's context columns (brand,
category ...) follow the question as labelled lines ("Brand: Acme"). A conversation (chat input)
is already a prompt: the messages before the assistant's last turn, that turn the completion.

Randomness comes from one seed (data.seed) in independent streams: one picks the sample, one the
question templates, and the split of a title is a hash of the title and the seed, so adding rows
never moves an existing title to another split.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodtune.chat import TITLE_CHARS, split_conversation
from prodtune.columns import CLEAN_COLUMNS
from prodtune.config import Config, DataConfig, ModelConfig, section_hash
from prodtune.errors import UserError
from prodtune.io import RunPaths, excerpt, write_json, write_jsonl
from prodtune.rules import text_key

SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- prompts

def question_for(title: str, template: str) -> str:
    """Fill a question template's {title} placeholder."""
    return template.replace("{title}", title)


def context_label(name: str) -> str:
    """A context column's label in the prompt: 'unit_price' -> 'Unit price'."""
    text = " ".join(name.replace("_", " ").replace("-", " ").split())
    return text[:1].upper() + text[1:]


def build_prompt(question: str, system_prompt: str = "",
                 context: dict[str, str | None] | None = None) -> list[dict[str, str]]:
    """The chat messages before the answer: an optional system message and the user question,
    then one labelled line per context value present, in the order given ("Brand: Acme")."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    lines = [f"{context_label(name)}: {value}" for name, value in (context or {}).items() if value]
    messages.append({"role": "user", "content": question + ("\n\n" + "\n".join(lines) if lines else "")})
    return messages


def as_question(text: str, templates: list[str]) -> str:
    """For `prodtune ask`: a bare product title becomes a question with the first template."""
    text = text.strip()
    if text.endswith("?") or text.lower().split(" ", 1)[0] in {
            "what", "describe", "tell", "who", "how", "is", "does", "give", "write", "why", "which"}:
        return text
    return question_for(text, templates[0])


def ask_prompt(question: str, data: DataConfig, clean_parquet: Path,
               context: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The prompt `prodtune ask` sends, built as training built it: a product question with the
    context lines in the training's order, or, for a run trained on conversations, the question
    as the user's message. Context fields the run was not trained with are an error."""
    names: list[str] | None = list(data.context_fields) if data.context_fields is not None else None
    chat = False
    if clean_parquet.is_file():  # what the run was trained on, auto-detected columns included
        import pyarrow.parquet as pq

        columns = pq.read_schema(clean_parquet).names
        names, chat = context_columns(columns), "messages" in columns
    given = dict(context or {})
    if names is not None:
        unknown = [k for k in given if k not in names]
        if unknown:
            trained = ", ".join(names) if names else "none (it was trained on " + (
                "conversations)" if chat else "titles alone)")
            raise UserError(f"--context {unknown[0]}: this run's context fields are {trained}; "
                            "give those, or leave --context out")
        given = {name: given.get(name) for name in names}
    if chat:
        return build_prompt(question.strip(), data.system_prompt)
    return build_prompt(as_question(question, data.question_templates), data.system_prompt, given)


def pick_templates(n: int, n_templates: int, seed: int) -> np.ndarray:
    """Index of the question template for each of n rows, from the seed's template stream."""
    return _rng(seed, "templates").integers(n_templates, size=n)


def sample_indices(n_rows: int, sample_size: int | None, seed: int, stream: str = "sample") -> np.ndarray:
    """A seeded random sample of row indices (all rows when sample_size is None or too big), sorted."""
    if sample_size is None or sample_size >= n_rows:
        return np.arange(n_rows)
    return np.sort(_rng(seed, stream).choice(n_rows, size=sample_size, replace=False))


def _rng(seed: int, stream: str) -> np.random.Generator:
    # Separate streams, so changing the sample size does not change which template a row gets.
    return np.random.default_rng([seed, {"sample": 0, "templates": 1, "tokens": 2}[stream]])


# ----------------------------------------------------------------------------- splits

def normalize_title(title: str) -> str:
    """The key that groups near-duplicate titles: NFKC, casefolded, whitespace and punctuation dropped.

    "Mog's Kittens", "MOG’S  kittens!" and "Ｍｏｇｓ Kittens" all become "mogskittens".
    """
    # The same key as the clean stage's one-per-title rule, so both group titles alike.
    text = unicodedata.normalize("NFKC", title)
    return text_key(text) or " ".join(text.casefold().split())


def _unit_hash(key: str, seed: int) -> float:
    """A stable number in [0, 1) for a key (Python's hash() changes between processes)."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(titles: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[list[str], list[str]]:
    """Split name for each title, and a note for each title moved to fill an empty split.

    All titles with one normalised key share a split. A key's split comes from a hash of the key and
    the seed: test is [0, test), validation [test, test+val), train the rest. With >= 3 keys, a split
    with a fraction > 0 that the hash left empty gets the key nearest its range from the biggest split.
    """
    return _assign_keys([normalize_title(t) for t in titles], val_fraction, test_fraction, seed)


def _assign_keys(keys: list[str], val_fraction: float, test_fraction: float,
                 seed: int) -> tuple[list[str], list[str]]:
    """assign_splits for titles already normalised (one key per row)."""
    bounds = {"test": (0.0, test_fraction),
              "validation": (test_fraction, test_fraction + val_fraction),
              "train": (test_fraction + val_fraction, 1.0)}
    u = {k: _unit_hash(k, seed) for k in dict.fromkeys(keys)}
    split_of = {k: next(s for s, (lo, hi) in bounds.items() if lo <= x < hi) for k, x in u.items()}

    moves = []
    if len(u) >= 3:
        for split in ("test", "validation", "train"):
            lo, hi = bounds[split]
            if hi <= lo or split in split_of.values():
                continue
            sizes = Counter(split_of.values())
            donors = [k for k in u if sizes[split_of[k]] > 1]
            key = min(donors, key=lambda k: (max(lo - u[k], u[k] - hi, 0.0), k))
            moves.append(f"title key {key!r}: {split_of[key]} -> {split} (the hash left {split} empty)")
            split_of[key] = split
    return [split_of[k] for k in keys], moves


# ----------------------------------------------------------------------------- report helpers

def length_stats(values: Sequence[int]) -> dict[str, float] | None:
    """min / median / mean / p95 / max of a list of lengths (None when empty)."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 1),
            "p95": round(float(np.percentile(a, 95)), 1), "max": int(a.max())}


def _offline_tokenizer(model_cfg: ModelConfig) -> Any:
    """The model's tokenizer from local files only (a folder, a GGUF, or the Hugging Face cache)."""
    from prodtune.models import load_tokenizer, local_model_path

    path = local_model_path(model_cfg)
    if not Path(path).expanduser().is_dir():
        from huggingface_hub import snapshot_download

        # Never reach the network from the format stage: use the hub cache or give up.
        path = snapshot_download(path, local_files_only=True)
    return load_tokenizer(model_cfg, path=str(path))


def tokenize_as_trl(tokenizer: Any, prompts: Sequence[list[dict[str, str]]],
                    completions: Sequence[list[dict[str, str]]], max_length: int | None = None,
                    batch: int = 1000) -> Iterator[tuple[list[int], int]]:
    """(token ids of prompt + completion, where the completion starts) per row, as TRL's SFTTrainer builds them.

    TRL tokenizes the prompt with the generation prompt and the whole conversation, and lets the
    completion start where the two diverge: the prompt's end, unless a chat template renders a
    prompt alone differently. Ids are cut to max_length from the right, as training cuts them.
    Rows go to the tokenizer `batch` at a time (one fast-tokenizer call each, a bounded output).
    """
    for i in range(0, len(prompts), batch):
        p, c = list(prompts[i:i + batch]), list(completions[i:i + batch])
        p_ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template([a + b for a, b in zip(p, c, strict=True)], tokenize=True,
                                                 return_dict=True)["input_ids"]
        for prompt, full in zip(p_ids, full_ids):
            yield list(full[:max_length]), _common_prefix_length(prompt, full)


def _common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    # trl.data_utils.common_prefix_length, written out: importing trl pulls torch and datasets
    # into the format stage (several seconds) for these four lines.
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------- the stage

def _read_clean(path: Path) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"'{path}' not found: run 'prodtune clean' first (same --config and overrides)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"'{path}' is not a readable parquet file ({e}); rerun 'prodtune clean'") from None
    missing = {"uid", "title", "content"} - set(table.column_names)
    if missing:
        raise UserError(f"'{path}' lacks columns {sorted(missing)}; rerun 'prodtune clean'")
    if table.num_rows == 0:
        raise UserError(f"'{path}' has no rows: cleaning dropped everything; see clean/clean_report.json "
                        "and loosen the data.* cleaning rules")
    return table


def context_columns(column_names: Sequence[str]) -> list[str]:
    """clean.parquet's context columns: every column after its own (uid, title, content, messages)."""
    return [c for c in column_names if c not in CLEAN_COLUMNS]


def format_rows(rows: list[dict[str, Any]], data: DataConfig,
                context: Sequence[str] = ()) -> tuple[dict[str, list[dict]], dict]:
    """Turn sampled clean rows into prompt-completion rows per split, and the facts for the report.

    Product rows get a question from a template and their context columns; a conversation (a
    row with messages) keeps its own turns. Either way the split is keyed by the normalised title
    (a conversation's first user message).
    """
    picks = pick_templates(len(rows), len(data.question_templates), data.seed)
    title_keys = [normalize_title(r["title"]) for r in rows]
    splits, moves = _assign_keys(title_keys, data.val_fraction, data.test_fraction, data.seed)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    keys: dict[str, set[str]] = {s: set() for s in SPLITS}
    used: Counter = Counter()
    for row, pick, split, key in zip(rows, picks, splits, title_keys):
        if row.get("messages"):
            prompt, completion = split_conversation(row["messages"], data.system_prompt)
            title = excerpt(row["title"], TITLE_CHARS)
        else:
            used[int(pick)] += 1
            question = question_for(row["title"], data.question_templates[pick])
            prompt = build_prompt(question, data.system_prompt, {name: row.get(name) for name in context})
            completion, title = [{"role": "assistant", "content": row["content"]}], row["title"]
        out[split].append({"prompt": prompt, "completion": completion, "title": title, "uid": row["uid"]})
        keys[split].add(key)
    templates = {t: used[i] for i, t in enumerate(data.question_templates)}
    return out, {"template_usage": templates, "split_moves": moves, "split_keys": keys}


def _split_facts(out: dict[str, list[dict]], titles: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    n_rows = sum(len(v) for v in out.values()) or 1
    n_titles = sum(len(t) for t in titles.values()) or 1
    return {s: {"rows": len(out[s]), "titles": len(titles[s]),
                "row_fraction": round(len(out[s]) / n_rows, 4),
                "title_fraction": round(len(titles[s]) / n_titles, 4)} for s in SPLITS}


def _length_report(out: dict[str, list[dict]], cfg: Config) -> dict[str, Any]:
    rows = [r for s in SPLITS for r in out[s]]
    prompts = [r["prompt"] for r in rows]
    completions = [r["completion"] for r in rows]
    report: dict[str, Any] = {"chars": {
        "prompt": length_stats([sum(len(m["content"]) for m in p) for p in prompts]),
        "completion": length_stats([len(c[0]["content"]) for c in completions]),
    }}
    if not cfg.data.count_tokens:
        report["tokens"] = None
        report["tokens_skipped"] = "data.count_tokens is false"
        return report
    try:
        tokenizer = _offline_tokenizer(cfg.model)
    except Exception as e:  # token counts are a nicety: any failure is recorded, never fatal
        report["tokens"] = None
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        report["tokens_skipped"] = (f"tokenizer of '{cfg.model.name_or_path}' not available offline "
                                    f"({type(e).__name__}: {first[:160]})")
        return report
    # Tokenizing is the slow part (~0.4 ms a row on 2 cores): a seeded sample gives the same picture.
    idx = sample_indices(len(rows), cfg.data.token_stats_rows, cfg.data.seed, stream="tokens")
    prompt_n, total = [], []
    for ids, start in tokenize_as_trl(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx]):
        prompt_n.append(start)
        total.append(len(ids))
    completion_n = [t - p for p, t in zip(prompt_n, total)]
    over = sum(t > cfg.train.max_length for t in total)
    report["tokens"] = {
        "tokenizer": cfg.model.name_or_path,
        "rows_counted": len(idx),
        "prompt": length_stats(prompt_n),
        "completion": length_stats(completion_n),
        "total": length_stats(total),
        "train_max_length": cfg.train.max_length,
        "over_train_max_length": over,
        "share_over_train_max_length": round(over / max(len(idx), 1), 4),
    }
    return report


def format_stage(cfg: Config) -> dict[str, Any]:
    """Stage 2: clean/clean.parquet -> format/{train,validation,test}.jsonl and format_report.json."""
    paths = RunPaths(cfg.run_dir)
    data = cfg.data
    if data.token_stats_rows is not None and data.token_stats_rows < 1:
        raise UserError(f"data.token_stats_rows={data.token_stats_rows}: give at least 1, or null for all rows "
                        "(data.count_tokens=false skips token counts)")
    table = _read_clean(paths.clean_parquet)
    idx = sample_indices(table.num_rows, data.sample_size, data.seed)
    rows = table.take(idx).to_pylist() if len(idx) < table.num_rows else table.to_pylist()
    context = context_columns(table.column_names)

    out, facts = format_rows(rows, data, context)
    report: dict[str, Any] = {
        "input": str(paths.clean_parquet),
        "kind": "chat" if "messages" in table.column_names else "product",
        "clean_rows": table.num_rows,
        "sample_size": data.sample_size,
        "rows": len(rows),
        "seed": data.seed,
        "target_fractions": {"validation": data.val_fraction, "test": data.test_fraction},
        "splits": _split_facts(out, facts["split_keys"]),
        "split_moves": facts["split_moves"],
        "context_fields": {name: {"rows": n, "share": round(n / max(len(rows), 1), 4)}
                           for name, n in ((name, sum(bool(r.get(name)) for r in rows)) for name in context)},
        "template_usage": facts["template_usage"],
        "system_prompt": data.system_prompt,
        "lengths": _length_report(out, cfg),
        "data_hash": section_hash(data),
        "outputs": {s: str(paths.split(s)) for s in SPLITS} | {"report": str(paths.format_report)},
    }
    report["summary"] = _summary(report)
    # Write every file under a temporary name first, then rename them in, the report last: an
    # interrupted run leaves the previous outputs whole, and other files in format/ (the pipeline's
    # .stage.json) stay where they are.
    paths.format.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".format.", suffix=".tmp", dir=paths.format) as tmp:
        finals = [paths.split(s) for s in SPLITS] + [paths.format_report]
        for split in SPLITS:
            write_jsonl(Path(tmp) / paths.split(split).name, out[split])
        write_json(Path(tmp) / paths.format_report.name, report)
        for final in finals:
            os.replace(Path(tmp) / final.name, final)
    return report


def _summary(report: dict[str, Any]) -> str:
    sampled = ("all" if report["rows"] == report["clean_rows"]
               else f"a seeded sample (seed {report['seed']}) of")
    what = "conversations" if report["kind"] == "chat" else "prompt-completion rows"
    lines = [f"format: {report['rows']} {what} from {sampled} {report['clean_rows']} clean rows"]
    if report["context_fields"]:
        lines.append("  context in the prompt: " + ", ".join(
            f"{name} ({f['rows']} rows, {f['share']:.0%})" for name, f in report["context_fields"].items()))
    for split in SPLITS:
        f = report["splits"][split]
        lines.append(f"  {split:<10} {f['rows']:>7} rows {f['titles']:>7} titles "
                     f"({f['row_fraction']:.1%})  {report['outputs'][split]}")
    tokens = report["lengths"]["tokens"]
    if tokens:
        lines.append(f"  tokens per example ({tokens['rows_counted']} rows counted): median "
                     f"{tokens['total']['median']:.0f}, max {tokens['total']['max']}; "
                     f"{tokens['share_over_train_max_length']:.1%} over train.max_length={tokens['train_max_length']}")
    else:
        lines.append(f"  tokens not counted: {report['lengths']['tokens_skipped']}")
    lines.append(f"  report: {report['outputs']['report']}")
    return "\n".join(lines)
