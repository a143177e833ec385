"""Stage 1 (clean): the raw input -> clean/clean.parquet and clean_report.json.

    prodtune clean --config configs/demo.yaml [data.raw_path=shop.csv data.title_field=name ...]

clean.parquet holds uid, title, content, then the context columns (data.context_fields) under
their own names, or, for chat input, the conversation (`messages`: its title is the first user
message, its content the last answer). The input is streamed in chunks of `data.chunk_rows` rows
(prodtune.rawdata and prodtune.tables read and parse them), so memory stays bounded whatever the
file size. The text rules (prodtune.rules) run over a whole column at a time: titles, contents,
each context column, every message. The rows are written to the parquet file as they come. A
large file is cleaned by worker processes, a chunk each; exact duplicates are found across the
whole file, in file order, in this process, from 64-bit hashes of the clean (title, content)
pairs (for chat, of the whole conversation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import tempfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from xxhash import xxh3_64_intdigest as _xxh64

from prodtune import chunks
from prodtune.chat import first_question, last_answer
from prodtune.chunks import Chunk
from prodtune.columns import Mapping
from prodtune.config import Config, DataConfig, section_hash
from prodtune.errors import UserError
from prodtune.io import RunPaths, atomic_dir, excerpt, write_json
from prodtune.rawdata import open_input, parse_chunk
from prodtune.rules import (N_EXAMPLES, Edit, cap_text, clean_column, is_review_blurb, rows_to_normalize,
                            text_key)

log = logging.getLogger(__name__)

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
DROP_RULES = ("bad_input", "missing", "no_answer", "too_short", "content_is_title", "review_blurb", "duplicate",
              "duplicate_title")
EDIT_RULES = ("entities", "html", "boilerplate", "unicode", "capped")
N_WARNINGS = 5
MAX_PROBLEMS_KEPT = 1000  # input problems listed in the report (all are counted)
POOL_MIN_BYTES = 32 << 20  # smaller inputs are cleaned in this process
CLEAN_FIELDS = ("raw_path", "drop_missing", "strip_html", "unescape_entities", "normalize_unicode",
                "remove_boilerplate", "min_content_chars", "drop_content_equals_title", "drop_review_blurbs",
                "max_content_chars",
                "dedupe", "one_per_title")


# ----------------------------------------------------------------------------- one chunk

@dataclass
class ChunkResult:
    """A cleaned chunk before the file-wide duplicate checks; small enough to pass between processes."""

    table: pa.Table
    lines: list[int]
    pair_hash: np.ndarray
    title_hash: np.ndarray | None
    read: int
    problems: list[str]
    position: int
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    spilled: str | None = None

    def example(self, rule: str, item: dict[str, Any]) -> None:
        items = self.examples.setdefault(rule, [])
        if len(items) < N_EXAMPLES:
            items.append(item)

    def drop(self, rule: str, line: int, uid: Any, title: Any, content: Any, why: str = "") -> None:
        self.dropped[rule] += 1
        if len(self.examples.get(rule, ())) < N_EXAMPLES:
            self.example(rule, {"line": line, "uid": uid, "title": excerpt(str(title)),
                                "content": excerpt(str(content))} | ({"why": why} if why else {}))


def _diff_window(before: str, after: str) -> tuple[str, str]:
    """before/after from a little ahead of their first difference, so a change at the end shows."""
    i, limit = 0, min(len(before), len(after))
    while i < limit and before[i] == after[i]:
        i += 1
    start = max(0, i - 60)
    lead = "…" if start else ""
    return lead + excerpt(before[start:]), lead + excerpt(after[start:])


def _as_text(value: Any) -> str:
    """With drop_missing off, a missing value becomes '' and any other value its text."""
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _take(keep: list[int], *columns: list[Any]) -> tuple[list[Any], ...]:
    return tuple([col[i] for i in keep] for col in columns)


def _count_edits(res: ChunkResult, rule: str, fields: list[tuple[str, list[Edit]]], lines: list[int],
                 uids: list[str]) -> None:
    """Rows changed by a rule (in any of the fields) and the first few as before/after examples."""
    touched = [edits for _, edits in fields if edits]
    if len(touched) == 1:
        res.changed[rule] += len(touched[0])
    elif touched:
        res.changed[rule] += len(set().union(*({e[0] for e in edits} for edits in touched)))
    shown = sorted((i, name, b, a) for name, edits in fields for i, b, a in edits[:N_EXAMPLES])
    rows_seen: set[int] = set()
    for i, name, before, after in shown:
        if i not in rows_seen and len(res.examples.get(rule, ())) < N_EXAMPLES:
            rows_seen.add(i)
            b, a = _diff_window(before, after)
            res.example(rule, {"line": lines[i], "uid": uids[i], "field": name, "before": b, "after": a})


def _clean_sparse(values: list[str | None], data: DataConfig, content: bool) -> dict[str, list[Edit]]:
    """clean_column over the values present (context values, message texts); edits name their rows.
    A value left empty by the rules becomes None (absent)."""
    at = [i for i, v in enumerate(values) if v is not None]
    texts = [values[i] for i in at]
    edits = clean_column(texts, data, content)  # type: ignore[arg-type]
    for i, text in zip(at, texts):
        values[i] = text or None
    return {rule: [(at[k], b, a) for k, b, a in found] for rule, found in edits.items()}


def _clean_context(context: dict[str, list[str | None]], data: DataConfig) -> list[tuple[str, dict[str, list[Edit]]]]:
    """The title's text rules on every context column, in place."""
    return [(name, _clean_sparse(values, data, content=False)) for name, values in context.items()]


def _clean_messages(messages: list[list[dict[str, str]]], data: DataConfig) -> list[tuple[str, dict[str, list[Edit]]]]:
    """The text rules on every message, in place: a description's rules on the assistant's turns,
    a title's on the others (no boilerplate rule). Edits are per conversation (the first per rule)."""
    found = []
    for name, answers in (("assistant", True), ("user/system", False)):
        where = [(i, j) for i, conv in enumerate(messages) for j, m in enumerate(conv)
                 if (m["role"] == "assistant") == answers]
        texts: list[str | None] = [messages[i][j]["content"] for i, j in where]
        edits = _clean_sparse(texts, data, content=answers)
        for (i, j), text in zip(where, texts):
            messages[i][j]["content"] = text or ""
        per_row: dict[str, list[Edit]] = {}
        for rule, changed in edits.items():
            first: dict[int, Edit] = {}
            for k, before, after in changed:
                first.setdefault(where[k][0], (where[k][0], before, after))
            per_row[rule] = list(first.values())
        found.append((name, per_row))
    return found


def clean_chunk(chunk: Chunk, data: DataConfig) -> ChunkResult:
    """Parse one chunk and apply every rule but the file-wide duplicate checks (left to the caller)."""
    rows = parse_chunk(chunk, data.drop_missing)
    mapping = chunk.mapping
    res = ChunkResult(table=None, lines=[], pair_hash=None, title_hash=None,  # type: ignore[arg-type]
                      read=rows.read, problems=rows.problems, position=chunk.position)
    for line, problem, text in rows.bad:
        res.dropped["bad_input"] += 1
        res.example("bad_input", {"line": line, "problem": problem, "text": text})
    res.dropped["bad_input"] += rows.lost
    for line, uid, title, content, why in rows.empty_examples:
        res.drop("missing", line, uid, title, content, why)
    res.dropped["missing"] += rows.empty - len(rows.empty_examples)
    uids, titles, contents, lines = rows.uids, rows.titles, rows.contents, rows.lines
    chat = rows.messages
    extra = [rows.context[name] for name in mapping.context] + ([chat] if chat is not None else [])

    if not rows.checked:  # the line-by-line parse: values of any type, empty strings
        keep = []
        for i, (t, c) in enumerate(zip(titles, contents)):
            if chat is not None and (not chat[i] or c is None):
                rule = "no_answer" if chat[i] else "missing"
                res.drop(rule, lines[i], uids[i], t, json.dumps(chat[i], ensure_ascii=False),
                         "no assistant turn" if chat[i] else "no messages")
                continue
            if t.__class__ is not str or c.__class__ is not str:
                if data.drop_missing:
                    res.drop("missing", lines[i], uids[i], t, c, "missing or not a string")
                    continue
                titles[i], contents[i] = _as_text(t), _as_text(c)
            if data.drop_missing and (not titles[i] or not contents[i]):
                res.drop("missing", lines[i], uids[i], t, c, "empty")
                continue
            keep.append(i)
        uids, titles, contents, lines, *extra = _take(keep, uids, titles, contents, lines, *extra)
    context = dict(zip(mapping.context, extra))
    chat = extra[-1] if chat is not None else None

    raw_titles, raw_contents = list(titles), list(contents)  # for the examples of later drops
    if chat is None:
        # The fast paths still have the text as Arrow strings: find what needs normalizing in bulk.
        scans = [None, None] if rows.arrow is None else [rows_to_normalize(c) for c in rows.arrow.columns[1:]]
        fields = [("title", clean_column(titles, data, content=False, to_normalize=scans[0])),
                  ("content", clean_column(contents, data, content=True, to_normalize=scans[1]))]
        fields += _clean_context(context, data)
    else:
        fields = _clean_messages(chat, data)
        titles = [first_question(conv) for conv in chat]
        contents = [conv[last_answer(conv)]["content"] for conv in chat]  # type: ignore[index]
    for rule in ("entities", "html", "boilerplate", "unicode"):
        _count_edits(res, rule, [(name, edits.get(rule, [])) for name, edits in fields], lines, uids)

    # The length rules, vectorized: only the rows they hit cost Python time.
    n = len(titles)
    clen = np.fromiter(map(len, contents), dtype=np.int64, count=n)
    tlen = np.fromiter(map(len, titles), dtype=np.int64, count=n)
    drop = (clen == 0) | (tlen == 0) if data.drop_missing else np.zeros(n, dtype=bool)
    for i in np.flatnonzero(drop).tolist():
        res.drop("missing", lines[i], uids[i], raw_titles[i], raw_contents[i], "empty after cleaning")
    short = ~drop & (clen < data.min_content_chars)
    for i in np.flatnonzero(short).tolist():
        res.drop("too_short", lines[i], uids[i], titles[i], contents[i])
    drop |= short
    if data.drop_content_equals_title:
        for i in np.flatnonzero(~drop & (clen <= 2 * tlen + 16)).tolist():
            if text_key(contents[i]) == text_key(titles[i]):
                res.drop("content_is_title", lines[i], uids[i], titles[i], contents[i])
                drop[i] = True
    if data.drop_review_blurbs and chat is None:  # press praise is a product description's problem
        for i in np.flatnonzero(~drop).tolist():
            if is_review_blurb(contents[i]):
                res.drop("review_blurb", lines[i], uids[i], titles[i], contents[i])
                drop[i] = True
    if data.max_content_chars:
        _cap(res, data.max_content_chars, drop, clen, contents, context, chat, lines, uids)
    if drop.any():
        keep = np.flatnonzero(~drop).tolist()
        uids, titles, contents, lines, *extra = _take(keep, uids, titles, contents, lines, *context.values(),
                                                      *([chat] if chat is not None else []))
        context = dict(zip(mapping.context, extra))
        chat = extra[-1] if chat is not None else None

    res.lines = lines
    if chat is None:
        res.pair_hash = np.fromiter((_xxh64(f"{t}\x00{c}".encode()) for t, c in zip(titles, contents)),
                                    dtype=np.uint64, count=len(titles))
    else:  # the same conversation twice: every message, roles included
        res.pair_hash = np.fromiter((_xxh64("\x00".join(f"{m['role']}\x01{m['content']}" for m in conv).encode())
                                     for conv in chat), dtype=np.uint64, count=len(chat))
    if data.one_per_title:
        res.title_hash = np.fromiter((_xxh64((text_key(t) or t).encode()) for t in titles),
                                     dtype=np.uint64, count=len(titles))
    columns = [uids, titles, contents, *context.values()] + ([chat] if chat is not None else [])
    res.table = pa.table(columns, schema=clean_schema(mapping))
    return res


def _cap(res: ChunkResult, max_chars: int, drop: np.ndarray, clen: np.ndarray, contents: list[str],
         context: dict[str, list[str | None]], chat: list[list[dict[str, str]]] | None,
         lines: list[int], uids: list[str]) -> None:
    """Cut the descriptions (a conversation's last answer) and context values over max_chars."""
    long_contents = np.flatnonzero(~drop & (clen > max_chars)).tolist()
    for i in long_contents:
        capped = contents[i] = cap_text(contents[i], max_chars)
        if chat is not None:
            chat[i][last_answer(chat[i])]["content"] = capped  # type: ignore[index]
        res.changed["capped"] += 1
        res.example("capped", {"line": lines[i], "uid": uids[i], "chars_before": int(clen[i]),
                               "chars_after": len(capped), "ends_with": excerpt(capped[-100:])})
    capped_rows = set()
    for values in context.values():
        for i, v in enumerate(values):
            if v is not None and len(v) > max_chars and not drop[i]:
                values[i] = cap_text(v, max_chars)
                capped_rows.add(i)
    res.changed["capped"] += len(capped_rows - set(long_contents))


def clean_schema(mapping: Mapping) -> pa.Schema:
    """clean.parquet's columns: uid, title, content, then each context column, or the conversation."""
    fields = [("uid", pa.string()), ("title", pa.string()), ("content", pa.string())]
    fields += [(name, pa.string()) for name in mapping.context]
    if mapping.chat:
        fields.append(("messages", MESSAGES))
    return pa.schema(fields)


# ----------------------------------------------------------------------------- the stage

def _results(chunks: Iterator[Chunk], data: DataConfig, workers: int,
             spill_dir: Path) -> Iterator[ChunkResult]:
    """Clean chunks in order, in worker processes when workers > 1 (at most 3 chunks ahead each).

    The workers' tables come back through files in a temporary folder under `spill_dir` (the
    output folder), so that a killed run leaves nothing outside the run folder.
    """
    if workers <= 1:
        for chunk in chunks:
            yield clean_chunk(chunk, data)
        return
    # fork where there is one: no `if __name__ == "__main__"` guard needed in a user's script, and
    # pyarrow's thread pools are fork-safe (apache/arrow#14594). The warning Python 3.12+ gives
    # about forking a process with threads concerns other libraries' threads, not ours.
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (out of memory) raises
    # BrokenProcessPool here instead of leaving us waiting forever.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_in_worker,
                                   initargs=(os.getpid(),))
    with pool, tempfile.TemporaryDirectory(prefix=".spill.", suffix=".tmp", dir=spill_dir,
                                           ignore_cleanup_errors=True) as spill:
        pending: deque = deque()
        try:
            for k, chunk in enumerate(chunks):
                if chunk.table is not None:  # CSV or parquet rows go to the worker the same way
                    chunk.table = _spill(chunk.table, os.path.join(spill, f"in{k}.arrow"))
                pending.append(pool.submit(_clean_in_worker, chunk, data, os.path.join(spill, f"{k}.arrow")))
                if len(pending) >= 3 * workers:  # slack for when this process is slow to collect
                    yield _unspill(pending.popleft().result())
            while pending:
                yield _unspill(pending.popleft().result())
        except BaseException:  # an error, Ctrl-C, or the consumer stopped: drop the queued chunks
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _clean_in_worker(chunk: Chunk, data: DataConfig, spill: str) -> ChunkResult:
    """clean_chunk in a worker process. The table goes back through a local file that the caller
    memory-maps: cheaper than pickling it through a pipe (about 1 s of CPU on 1.3M rows)."""
    if isinstance(chunk.table, str):
        chunk.table = _unspilled(chunk.table)
    res = clean_chunk(chunk, data)
    res.table, res.spilled = _spill(res.table, spill), spill  # type: ignore[assignment]
    return res


def _spill(table: pa.Table, path: str) -> str:
    """Write a table to an Arrow IPC file for another process to memory-map; returns the path."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _unspilled(path: str) -> pa.Table:
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    with contextlib.suppress(OSError):  # the mapping outlives the name (POSIX); else the folder goes
        os.unlink(path)
    return table


def _unspill(res: ChunkResult) -> ChunkResult:
    res.table = _unspilled(res.spilled)  # type: ignore[arg-type]
    return res


def _in_worker(parent: int) -> None:
    chunks.ARROW_THREADS = False
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux), so that a killed clean
    leaves no workers behind waiting forever for chunks."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end when the queue they read closes
        return
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def _workers(data: DataConfig, size: int | None) -> int:
    if size is None or size < POOL_MIN_BYTES:
        return 1
    return data.clean_workers or min(4, os.cpu_count() or 1)


class HashSet:
    """A growing set of 64-bit hashes kept as one sorted numpy array: 8 bytes per distinct row."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return self._sorted.size

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of the hashes not seen before (in the set or earlier in this batch); adds them."""
        order = np.argsort(hashes, kind="stable")  # stable: the first of equal hashes wins
        ordered = hashes[order]
        new = np.ones(ordered.size, dtype=bool)
        new[1:] = ordered[1:] != ordered[:-1]
        if self._sorted.size:
            at = np.minimum(np.searchsorted(self._sorted, ordered), self._sorted.size - 1)
            new &= self._sorted[at] != ordered
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        self._sorted = np.sort(np.concatenate([self._sorted, ordered[new]]), kind="stable")
        mask = np.empty_like(new)
        mask[order] = new
        return mask


def _drop_duplicates(res: ChunkResult, data: DataConfig, pairs: HashSet, titles: HashSet,
                     dropped: Counter, examples: dict[str, list[dict[str, Any]]]) -> pa.Table:
    """File-wide exact (title, content) duplicates and, optionally, repeated normalised titles."""
    keep = np.ones(res.table.num_rows, dtype=bool)
    rule = np.full(res.table.num_rows, "", dtype=object)
    if data.dedupe:
        keep = pairs.add_new(res.pair_hash)
        rule[~keep] = "duplicate"
    if res.title_hash is not None:
        first = keep.copy()
        first[keep] = titles.add_new(res.title_hash[keep])
        rule[keep & ~first] = "duplicate_title"
        keep = first
    if keep.all():
        return res.table
    dup = np.flatnonzero(~keep)
    for i in dup:
        dropped[rule[i]] += 1
        have = examples.setdefault(rule[i], [])
        if len(have) < N_EXAMPLES:
            row = res.table.slice(i, 1).to_pylist()[0]
            have.append({"line": res.lines[i], "uid": row["uid"], "title": excerpt(row["title"]),
                         "content": excerpt(row["content"])})
    # Zero-copy slices between the dropped rows instead of a filter() that copies every string.
    starts = np.concatenate([[0], dup + 1])
    ends = np.concatenate([dup, [res.table.num_rows]])
    return pa.concat_tables([res.table.slice(a, b - a) for a, b in zip(starts, ends) if b > a]
                            or [res.table.slice(0, 0)])


def clean_data(data: DataConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Clean data.raw_path into out_dir/clean.parquet (and clean.csv); returns the report (not written)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out_dir = Path(out_dir)
    source = open_input(data)
    schema = clean_schema(source.mapping)
    workers = _workers(data, source.size)
    parquet_path, csv_path = out_dir / "clean.parquet", out_dir / "clean.csv"
    read = kept = 0
    dropped: Counter = Counter()
    changed: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    n_problems = 0
    seen_pairs, seen_titles = HashSet(), HashSet()
    with_context = Counter({name: 0 for name in source.mapping.context})
    bar = tqdm(total=source.total, unit=source.unit, unit_scale=True, disable=not progress,
               desc=f"clean {Path(data.raw_path).name}", mininterval=1.0, delay=2.0, leave=False)
    writer = pq.ParquetWriter(parquet_path, schema, compression="snappy", use_dictionary=False,
                              write_statistics=False)
    csv_writer = pacsv.CSVWriter(csv_path, _csv_schema(schema)) if data.write_csv else None
    try:
        for res in _results(source.chunks, data, workers, out_dir):
            read += res.read
            dropped.update(res.dropped)
            changed.update(res.changed)
            for rule, items in res.examples.items():
                have = examples.setdefault(rule, [])
                have.extend(items[: N_EXAMPLES - len(have)])
            for msg in res.problems:
                if n_problems < N_WARNINGS:
                    log.warning(msg)
                if n_problems < MAX_PROBLEMS_KEPT:
                    problems.append(msg)
                n_problems += 1
            table = _drop_duplicates(res, data, seen_pairs, seen_titles, dropped, examples)
            kept += table.num_rows
            with_context.update({name: table.num_rows - table.column(name).null_count for name in with_context})
            writer.write_table(table)
            if csv_writer:
                csv_writer.write_table(_csv_table(table))
            bar.update(res.position - bar.n)
    finally:
        bar.close()
        writer.close()
        if csv_writer:
            csv_writer.close()
    if read == 0:
        why = problems[-1] if problems else "no records in it: blank lines, or a header alone"
        raise UserError(f"data.raw_path '{data.raw_path}': nothing to clean ({why})")
    if n_problems > N_WARNINGS:
        log.warning(f"... and {n_problems - N_WARNINGS} more problems in {Path(data.raw_path).name}; "
                    "all are listed in clean_report.json")
    if kept == 0:
        log.warning(f"clean: all {read} rows were dropped; see clean_report.json and loosen the data.* rules")
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {
        "input": source.described,
        "format": source.format,
        "mapping": source.mapping.describe(),
        "rows_read": read,
        "rows_kept": kept,
        "dropped": {rule: dropped[rule] for rule in DROP_RULES},
        "changed": {rule: changed[rule] for rule in EDIT_RULES},
        "examples": {rule: examples[rule] for rule in (*DROP_RULES, *EDIT_RULES) if rule in examples},
        "context_rows": dict(with_context),
        "problems": {"count": n_problems, "listed": problems},
        "rules": {k: v for k, v in dataclasses.asdict(data).items() if k in CLEAN_FIELDS},
        "seconds": round(seconds, 2),
        "rows_per_second": round(read / seconds) if seconds else None,
        "workers": workers,
        "outputs": {"parquet": str(parquet_path)} | ({"csv": str(csv_path)} if data.write_csv else {}),
    }
    return report


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    """clean.csv's columns: a conversation is written as its JSON text (CSV has no lists)."""
    return pa.schema([(f.name, pa.string()) for f in schema])


def _csv_table(table: pa.Table) -> pa.Table:
    if "messages" not in table.column_names:
        return table
    text = pa.array([json.dumps(m, ensure_ascii=False) for m in table.column("messages").to_pylist()], pa.string())
    return table.set_column(table.column_names.index("messages"), "messages", text)


def _summary(report: dict[str, Any]) -> str:
    dropped = ", ".join(f"{n} {rule}" for rule, n in report["dropped"].items() if n) or "none"
    changed = ", ".join(f"{n} {rule}" for rule, n in report["changed"].items() if n) or "none"
    lines = [f"clean: kept {report['rows_kept']:,} of {report['rows_read']:,} rows "
             f"in {report['seconds']:.1f} s ({report['input']})",
             f"  dropped: {dropped}",
             f"  changed: {changed}"]
    if report["problems"]["count"]:
        lines.append(f"  input problems: {report['problems']['count']} (listed in the report)")
    lines += [f"  {name}: {path}" for name, path in report["outputs"].items()]
    return "\n".join(lines)


def clean_stage(cfg: Config) -> dict[str, Any]:
    """Stage 1: data.raw_path -> clean/clean.parquet (+ clean.csv) and clean/clean_report.json."""
    paths = RunPaths(cfg.run_dir)
    # The clean folder is built under a temporary name and swapped in whole: no half file, ever.
    with atomic_dir(paths.clean) as tmp:
        report = clean_data(cfg.data, tmp)
        report["outputs"] = {name: str(paths.clean / Path(p).name) for name, p in report["outputs"].items()}
        report["outputs"]["report"] = str(paths.clean_report)
        report["data_hash"] = section_hash(cfg.data)
        report["summary"] = _summary(report)
        write_json(tmp / paths.clean_report.name, report)
    return report
