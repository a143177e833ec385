"""Stage 1 (clean): the raw file -> clean/clean.parquet (uid, title, content) and clean_report.json.

    prodtune clean --config configs/demo.yaml [data.raw_path=data/trn.json.gz ...]

The input is streamed in chunks of `data.chunk_rows` lines (prodtune.rawdata reads and parses
them), so memory stays bounded whatever the file size. Each rule runs over a whole column with
a C-speed test in front ('&' in s, s.isascii() ...), so the most rows, which need no work, cost
almost nothing; the rows are written to the parquet file as they come. A large file is cleaned
by worker processes, a chunk each; exact duplicates are found across the whole file, in file
order, in this process, from 64-bit hashes of the clean (title, content) pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import html
import json
import logging
import multiprocessing
import os
import re
import tempfile
import time
import unicodedata
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune import rawdata
from prodtune.config import Config, DataConfig, save_config, section_hash
from prodtune.errors import UserError
from prodtune.io import RunPaths, atomic_dir, excerpt, write_json
from prodtune.rawdata import Chunk, open_chunks, parse_chunk

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
DROP_RULES = ("bad_input", "missing", "too_short", "content_is_title", "review_blurb", "duplicate",
              "duplicate_title")
EDIT_RULES = ("entities", "html", "boilerplate", "unicode", "capped")
N_EXAMPLES = 3
N_WARNINGS = 5
MAX_PROBLEMS_KEPT = 1000  # input problems listed in the report (all are counted)
POOL_MIN_BYTES = 32 << 20  # smaller inputs are cleaned in this process
CLEAN_FIELDS = ("raw_path", "drop_missing", "strip_html", "unescape_entities", "normalize_unicode",
                "remove_boilerplate", "min_content_chars", "drop_content_equals_title", "drop_review_blurbs",
                "max_content_chars",
                "dedupe", "one_per_title")

# ----------------------------------------------------------------------------- one string

_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|ul|ol|tr|td|th|h[1-6]|table|hr|blockquote|dd|dt)\b[^<>]*>",
                        re.IGNORECASE)
_TAG = re.compile(r"<!--.*?-->|<\s*/?\s*[A-Za-z][A-Za-z0-9]*\b[^<>]*>", re.DOTALL)
# "--This text refers to thePaperbackedition." (the edition name lost its spaces with its <i> tag),
# "--This text refers to an out of print or unavailable edition of this title.", ...
# It starts with a literal so that re can find it with a fast substring search (a leading \s* or
# (?i) made this rule cost 60 µs a row); the "--This " in front is trimmed by remove_boilerplate.
_BOILERPLATE = re.compile(r"text refers to\s*[^.]{0,80}?edition(?: of this title)?\.?")
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_INVISIBLE = re.compile("[\u00ad\u200b\u2060\ufeff]")  # soft hyphen, zero-width space, word joiner, BOM
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NON_WORD = re.compile(r"[\W_]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
# Review blurbs: "'A wonderful book' Daily Mail 'Superb' The Times". A quoted passage opens after a
# space (or at the start) and closes before a space or punctuation, so "don't" is not a quote; the
# pattern starts with the quote character so that re skips to candidates quickly (~7 µs a row).
_QUOTED = re.compile(r"""['"\u2018\u201c](?<![^\s]['"\u2018\u201c])(.{8,}?)['"\u2019\u201d](?=[\s.,;:!?)]|$)""")
_CAPITALISED = re.compile(r"[A-Z][a-z]+")
_PUBLICATIONS = frozenset(
    "Times Guardian Observer Telegraph Daily Independent Sunday Express Mirror Magazine Weekly Kirkus Journal "
    "Booklist Review Spectator Tribune Post Herald Mail Standard Evening Scotsman Literary Chronicle Globe "
    "Gazette Newsweek Esquire Vogue Listener Bookseller Economist".split())
_QUOTE_CHARS = ("'", '"', "\u2018", "\u201c")


def unescape_entities(text: str) -> str:
    """html.unescape until nothing changes (at most 3 rounds): '&amp;#8217;' -> '&#8217;' -> '’'."""
    return _unescape(text)[0]


@functools.lru_cache(maxsize=8192)
def _charref(ref: str) -> tuple[str, bool]:
    """html.unescape of one entity, and whether normalize_text could never change what it gives:
    letters, digits, punctuation or symbols, NFKC-stable, none that composes with a neighbour."""
    text = html.unescape(ref)
    safe = unicodedata.is_normalized("NFKC", text) and all(
        unicodedata.category(ch)[0] in "LNPS" and not unicodedata.combining(ch)
        and not 0x1100 <= ord(ch) <= 0x11FF for ch in text)  # Hangul jamo compose too
    return text, safe


def _unescape(text: str) -> tuple[str, bool]:
    """unescape_entities, and whether every replacement was safe (see _charref)."""
    safe = True

    def one(m: re.Match) -> str:
        nonlocal safe
        new, ok = _charref(m.group(0))
        safe = safe and ok
        return new

    for _ in range(3):
        # html.unescape's own pattern: a reference's replacement depends on its match alone, so
        # this gives html.unescape's result, with each distinct entity looked up once (cached).
        new = _CHARREF.sub(one, text)
        if new == text or "&" not in new:
            return new, safe
        text = new
    return text, safe


def strip_tags(text: str) -> str:
    """Drop HTML tags and comments; block tags (<br>, <p>, <li> ...) become a space."""
    return _TAG.sub("", _BLOCK_TAG.sub(" ", text)).strip()


def remove_boilerplate(text: str) -> str:
    """Remove Amazon's '--This text refers to ... edition.' notes."""
    parts, last, at = [], 0, text.find("text refers to")
    while at >= 0:
        m = _BOILERPLATE.match(text, at)
        if m and text[max(0, at - 5):at].lower() == "this ":
            parts.append(text[last:at - 5].rstrip(" -\t\r\n"))
            last = m.end()
        at = text.find("text refers to", at + 14)
    if not parts:
        return text
    parts.append(text[last:])
    return " ".join(p for p in map(str.strip, parts) if p)


def needs_normalizing(text: str) -> bool:
    """Cheap test in front of normalize_text: non-ASCII, control characters or stray spaces."""
    return (not text.isascii() or not text.isprintable() or "  " in text
            or text[:1] == " " or text[-1:] == " ")


def normalize_text(text: str) -> str:
    """NFKC, invisible characters removed, control characters and whitespace runs -> one space."""
    if not text.isascii() and not unicodedata.is_normalized("NFKC", text):  # the check is cheap
        text = unicodedata.normalize("NFKC", text)
    if not text.isprintable():  # controls, invisible (format) characters, odd spaces
        return " ".join(_CONTROL.sub(" ", _INVISIBLE.sub("", text)).split())
    # Printable text has no whitespace but " ": replace() is several times faster than split().
    while "  " in text:
        text = text.replace("  ", " ")
    return text.strip(" ")


def is_review_blurb(text: str) -> bool:
    """True when a content is press praise rather than a description: mostly quoted passages, or a
    short text naming two or more publications ("... easy to use. The Sunday Times Superbly handy.
    The Observer"). Trained on, such rows teach a model to invent quotes and attribute them."""
    if len(text) < 700 and sum(w in _PUBLICATIONS for w in _CAPITALISED.findall(text)) >= 2:
        return True
    if not any(q in text for q in _QUOTE_CHARS):
        return False
    quoted = sum(len(m.group(1)) for m in _QUOTED.finditer(text))
    return quoted >= 0.4 * len(text)


def text_key(text: str) -> str:
    """Comparison key: casefolded, punctuation and whitespace dropped ('The Prophet.' == 'the prophet')."""
    return _NON_WORD.sub("", text.casefold())


def cap_text(text: str, max_chars: int) -> str:
    """Cut text to at most max_chars at the last sentence end, else the last space, in the second half."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    end = 0
    for m in _SENTENCE_END.finditer(head, max(0, max_chars // 2 - 8)):  # the second half only
        end = m.end()
    if end > max_chars // 2:
        return head[:end].rstrip()
    space = head.rfind(" ")
    return (head[:space] if space > max_chars // 2 else head[:max_chars]).rstrip()


Edit = tuple[int, str, str]  # (row index in the chunk, text before, text after)


def clean_column(texts: list[str], data: DataConfig, content: bool,
                 to_normalize: np.ndarray | None = None) -> dict[str, list[Edit]]:
    """Apply the enabled edit rules to a column of titles or contents, in place.

    A rule at a time over the column: a C-speed test ('&' in s, s.isascii() ...) picks the few rows
    the rule can change, and only those pay for it. Returns, per rule, the rows it changed, with the
    text just before and after for the first few. `to_normalize`, when given, lists the rows of the
    raw column that need_normalizing (found faster in bulk by rows_to_normalize).
    """
    rules = [("entities", data.unescape_entities, "&", _unescape),
             ("html", data.strip_html, "<", strip_tags),
             ("boilerplate", content and data.remove_boilerplate, "text refers to", remove_boilerplate)]
    edits: dict[str, list[Edit]] = {}
    unsafe: set[int] = set()  # rows given a character by an entity that normalizing might change
    for rule, wanted, test, fn in rules:
        if wanted:
            found = [i for i, s in enumerate(texts) if test in s]
            edits[rule] = _edit(texts, found, fn, unsafe if rule == "entities" else None)
    if data.normalize_unicode:
        if to_normalize is None:
            rows = [i for i, s in enumerate(texts) if needs_normalizing(s)]
        else:  # the bulk scan saw the raw text: recheck rows that unsafe entities or tags changed
            touched = unsafe | {e[0] for e in edits.get("html", ())}
            rows = sorted(set(to_normalize.tolist()) | {i for i in touched if needs_normalizing(texts[i])})
        edits["unicode"] = _edit(texts, rows, normalize_text)
    else:
        _edit(texts, [i for i, s in enumerate(texts) if s[:1].isspace() or s[-1:].isspace()], str.strip)
    return edits


def rows_to_normalize(column: pa.ChunkedArray) -> np.ndarray:
    """Rows of a string column that needs_normalizing, found with numpy over the UTF-8 bytes.

    A byte outside printable ASCII, two spaces in a row, or a space at either end. About twice as
    fast as the str tests row by row, which is what most of a clean's time goes to otherwise.
    """
    found, base = [], 0
    for arr in column.chunks:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
        if arr.buffers()[2] is None or offsets[-1] == offsets[0]:
            base += len(arr)
            continue
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        b = data[offsets[0]: offsets[-1]]
        flag = (b - np.uint8(32)) > 94  # below 32 or above 126, in one pass (uint8 wraps around)
        space = b == 32
        flag[1:] |= space[1:] & space[:-1]
        at = np.flatnonzero(flag) + offsets[0]
        rows = np.searchsorted(offsets, at, side="right") - 1
        filled = np.flatnonzero(offsets[1:] > offsets[:-1])
        ends = filled[(data[offsets[filled]] == 32) | (data[offsets[filled + 1] - 1] == 32)]
        found.append(np.union1d(rows, ends) + base)
        base += len(arr)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _edit(texts: list[str], rows: list[int], fn: Any, unsafe: set[int] | None = None) -> list[Edit]:
    """Apply fn to texts[i] for i in rows; with `unsafe`, fn gives (text, safe) and unsafe rows are noted."""
    changed: list[Edit] = []
    for i in rows:
        before = texts[i]
        after = fn(before)
        if unsafe is not None:
            after, safe = after
            if not safe:
                unsafe.add(i)
        if after != before:
            texts[i] = after
            changed.append((i, before, after) if len(changed) < N_EXAMPLES else (i, "", ""))
    return changed


def clean_text(text: str, data: DataConfig, content: bool = True) -> str:
    """One title or content through the enabled edit rules (clean_chunk does them a column at a time)."""
    texts = [text]
    clean_column(texts, data, content)
    return texts[0]


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


try:  # xxhash comes with datasets; blake2b is the slower stand-in
    from xxhash import xxh3_64_intdigest as _xxh64
except ImportError:  # pragma: no cover
    def _xxh64(b: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def _as_text(value: Any) -> str:
    """With drop_missing off, a missing value becomes '' and any other value its text."""
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _take(keep: list[int], *columns: list[Any]) -> tuple[list[Any], ...]:
    return tuple([col[i] for i in keep] for col in columns)


def _count_edits(res: ChunkResult, rule: str, title_edits: list[Edit], content_edits: list[Edit],
                 lines: list[int], uids: list[str]) -> None:
    """Rows changed by a rule (title, content or both) and the first few as before/after examples."""
    if title_edits and content_edits:
        res.changed[rule] += len({e[0] for e in title_edits} | {e[0] for e in content_edits})
    else:
        res.changed[rule] += len(title_edits) + len(content_edits)
    shown = sorted([(i, "content", b, a) for i, b, a in content_edits[:N_EXAMPLES]]
                   + [(i, "title", b, a) for i, b, a in title_edits[:N_EXAMPLES]])
    rows_seen: set[int] = set()
    for i, name, before, after in shown:
        if i not in rows_seen and len(res.examples.get(rule, ())) < N_EXAMPLES:
            rows_seen.add(i)
            b, a = _diff_window(before, after)
            res.example(rule, {"line": lines[i], "uid": uids[i], "field": name, "before": b, "after": a})


def clean_chunk(chunk: Chunk, data: DataConfig) -> ChunkResult:
    """Parse one chunk and apply every rule but the file-wide duplicate checks (left to the caller)."""
    rows = parse_chunk(chunk, data.drop_missing)
    res = ChunkResult(table=None, lines=[], pair_hash=None, title_hash=None,  # type: ignore[arg-type]
                      read=rows.read, problems=rows.problems, position=chunk.position)
    for line, problem, text in rows.bad:
        res.dropped["bad_input"] += 1
        res.example("bad_input", {"line": line, "problem": problem, "text": text})
    for line, uid, title, content in rows.empty_examples:
        res.drop("missing", line, uid, title, content, "empty")
    res.dropped["missing"] += rows.empty - len(rows.empty_examples)
    uids, titles, contents, lines = rows.uids, rows.titles, rows.contents, rows.lines

    if not rows.checked:  # the line-by-line parse: values of any type, empty strings
        keep = []
        for i, (t, c) in enumerate(zip(titles, contents)):
            if t.__class__ is not str or c.__class__ is not str:
                if data.drop_missing:
                    res.drop("missing", lines[i], uids[i], t, c, "missing or not a string")
                    continue
                titles[i], contents[i] = _as_text(t), _as_text(c)
            if data.drop_missing and (not titles[i] or not contents[i]):
                res.drop("missing", lines[i], uids[i], t, c, "empty")
                continue
            keep.append(i)
        uids, titles, contents, lines = _take(keep, uids, titles, contents, lines)

    raw_titles, raw_contents = list(titles), list(contents)  # for the examples of later drops
    # The fast path still has the text as Arrow strings: find what needs normalizing in bulk.
    scans = [None, None] if rows.arrow is None else [rows_to_normalize(c) for c in rows.arrow.columns[1:]]
    title_edits = clean_column(titles, data, content=False, to_normalize=scans[0])
    content_edits = clean_column(contents, data, content=True, to_normalize=scans[1])
    for rule in ("entities", "html", "boilerplate", "unicode"):
        _count_edits(res, rule, title_edits.get(rule, []), content_edits.get(rule, []), lines, uids)

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
    if data.drop_review_blurbs:
        for i in np.flatnonzero(~drop).tolist():
            if is_review_blurb(contents[i]):
                res.drop("review_blurb", lines[i], uids[i], titles[i], contents[i])
                drop[i] = True
    if data.max_content_chars:
        for i in np.flatnonzero(~drop & (clen > data.max_content_chars)).tolist():
            capped = contents[i] = cap_text(contents[i], data.max_content_chars)
            res.changed["capped"] += 1
            res.example("capped", {"line": lines[i], "uid": uids[i], "chars_before": int(clen[i]),
                                   "chars_after": len(capped), "ends_with": excerpt(capped[-100:])})
    if drop.any():
        uids, titles, contents, lines = _take(np.flatnonzero(~drop).tolist(), uids, titles, contents, lines)

    res.lines = lines
    res.pair_hash = np.fromiter((_xxh64(f"{t}\x00{c}".encode()) for t, c in zip(titles, contents)),
                                dtype=np.uint64, count=len(titles))
    if data.one_per_title:
        res.title_hash = np.fromiter((_xxh64((text_key(t) or t).encode()) for t in titles),
                                     dtype=np.uint64, count=len(titles))
    res.table = pa.table([uids, titles, contents], schema=SCHEMA)
    return res


# ----------------------------------------------------------------------------- the stage

def _results(chunks: Iterator[Chunk], data: DataConfig, workers: int) -> Iterator[ChunkResult]:
    """Clean chunks in order, in worker processes when workers > 1 (at most 3 chunks ahead each)."""
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
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_in_worker)
    with pool, tempfile.TemporaryDirectory(prefix="prodtune-clean-", ignore_cleanup_errors=True) as spill:
        pending: deque = deque()
        try:
            for k, chunk in enumerate(chunks):
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
    res = clean_chunk(chunk, data)
    with pa.OSFile(spill, "wb") as sink, pa.ipc.new_file(sink, res.table.schema) as writer:
        writer.write_table(res.table)
    res.table, res.spilled = None, spill  # type: ignore[assignment]
    return res


def _unspill(res: ChunkResult) -> ChunkResult:
    res.table = pa.ipc.open_file(pa.memory_map(res.spilled)).read_all()
    with contextlib.suppress(OSError):  # the mapping outlives the name (POSIX); else the folder goes
        os.unlink(res.spilled)
    return res


def _in_worker() -> None:
    rawdata.ARROW_THREADS = False


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
    chunks, size, described = open_chunks(data.raw_path, data.chunk_rows)
    workers = _workers(data, size)
    parquet_path, csv_path = out_dir / "clean.parquet", out_dir / "clean.csv"
    read = kept = 0
    dropped: Counter = Counter()
    changed: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    n_problems = 0
    seen_pairs, seen_titles = HashSet(), HashSet()
    bar = tqdm(total=size, unit="B" if size else " rows", unit_scale=True, disable=not progress,
               desc=f"clean {Path(data.raw_path).name}", mininterval=1.0, delay=2.0, leave=False)
    writer = pq.ParquetWriter(parquet_path, SCHEMA, compression="snappy", use_dictionary=False,
                              write_statistics=False)
    csv_writer = pacsv.CSVWriter(csv_path, SCHEMA) if data.write_csv else None
    try:
        for res in _results(chunks, data, workers):
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
            writer.write_table(table)
            if csv_writer:
                csv_writer.write_table(table)
            bar.update(res.position - bar.n)
    finally:
        bar.close()
        writer.close()
        if csv_writer:
            csv_writer.close()
    if read == 0:
        why = problems[-1] if problems else "no records in it, only blank lines"
        raise UserError(f"data.raw_path '{data.raw_path}': nothing to clean ({why})")
    if n_problems > N_WARNINGS:
        log.warning(f"... and {n_problems - N_WARNINGS} more problems in {Path(data.raw_path).name}; "
                    "all are listed in clean_report.json")
    if kept == 0:
        log.warning(f"clean: all {read} rows were dropped; see clean_report.json and loosen the data.* rules")
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {
        "input": described,
        "rows_read": read,
        "rows_kept": kept,
        "dropped": {rule: dropped[rule] for rule in DROP_RULES},
        "changed": {rule: changed[rule] for rule in EDIT_RULES},
        "examples": {rule: examples[rule] for rule in (*DROP_RULES, *EDIT_RULES) if rule in examples},
        "problems": {"count": n_problems, "listed": problems},
        "rules": {k: v for k, v in dataclasses.asdict(data).items() if k in CLEAN_FIELDS},
        "seconds": round(seconds, 2),
        "rows_per_second": round(read / seconds) if seconds else None,
        "workers": workers,
        "outputs": {"parquet": str(parquet_path)} | ({"csv": str(csv_path)} if data.write_csv else {}),
    }
    return report


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
    save_config(cfg, paths.config)
    # The clean folder is built under a temporary name and swapped in whole: no half file, ever.
    with atomic_dir(paths.clean) as tmp:
        report = clean_data(cfg.data, tmp)
        report["outputs"] = {name: str(paths.clean / Path(p).name) for name, p in report["outputs"].items()}
        report["outputs"]["report"] = str(paths.clean_report)
        report["data_hash"] = section_hash(cfg.data)
        report["summary"] = _summary(report)
        write_json(tmp / paths.clean_report.name, report)
    return report
