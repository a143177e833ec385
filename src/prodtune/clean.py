"""Stage 1 (clean): the raw file -> clean/clean.parquet (uid, title, content) and clean_report.json.

    prodtune clean --config configs/demo.yaml [data.raw_path=data/trn.json.gz ...]

The input is streamed in chunks of `data.chunk_rows` lines, so memory stays bounded whatever the
file size. Each chunk is parsed with pyarrow's JSON reader (a bad line sends just that chunk to a
line-by-line parse that names the line), cleaned row by row with cheap substring tests in front
of every costly rule (most rows have no '<', no '&' and are ASCII), and written to the parquet
file as it goes. Chunks are cleaned by worker processes when the file is large; exact duplicates
are found across the whole file in this process, in file order, from a set of 64-bit hashes.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import html
import itertools
import json
import logging
import multiprocessing
import os
import re
import tempfile
import time
import unicodedata
import warnings
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune.config import Config, DataConfig, save_config, section_hash
from prodtune.errors import UserError
from prodtune.io import RunPaths, atomic_dir, write_json

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
DROP_RULES = ("bad_input", "missing", "too_short", "content_is_title", "duplicate", "duplicate_title")
EDIT_RULES = ("entities", "html", "boilerplate", "unicode", "capped")
N_EXAMPLES = 3
N_WARNINGS = 5
EXAMPLE_CHARS = 240
POOL_MIN_BYTES = 32 << 20  # smaller inputs are cleaned in this process (workers take ~1 s to start)

# ----------------------------------------------------------------------------- one string

_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|ul|ol|tr|td|th|h[1-6]|table|hr|blockquote|dd|dt)\b[^<>]*>",
                        re.IGNORECASE)
_TAG = re.compile(r"<!--.*?-->|<\s*/?\s*[A-Za-z][A-Za-z0-9]*\b[^<>]*>", re.DOTALL)
# "--This text refers to thePaperbackedition." (the edition name lost its spaces with its <i> tag),
# "--This text refers to an out of print or unavailable edition of this title.", ...
# It starts with a literal so that re can find it with a fast substring search (a leading \s* or
# (?i) made this rule cost 60 µs a row); the "--This " in front is trimmed by remove_boilerplate.
_BOILERPLATE = re.compile(r"text refers to\s*[^.]{0,80}?edition(?: of this title)?\.?")
_INVISIBLE = re.compile("[\u00ad\u200b\u2060\ufeff]")  # soft hyphen, zero-width space, word joiner, BOM
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NON_WORD = re.compile(r"[\W_]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")



def unescape_entities(text: str) -> str:
    """html.unescape until nothing changes (at most 3 rounds): '&amp;#8217;' -> '&#8217;' -> '’'."""
    for _ in range(3):
        new = html.unescape(text)
        if new == text or "&" not in new:
            return new
        text = new
    return text


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
    if not text.isprintable():  # controls, but also the invisible (format) characters
        text = _CONTROL.sub(" ", _INVISIBLE.sub("", text))
    elif "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(text.split())


def text_key(text: str) -> str:
    """Comparison key: casefolded, punctuation and whitespace dropped ('The Prophet.' == 'the prophet')."""
    return _NON_WORD.sub("", text.casefold())


def cap_text(text: str, max_chars: int) -> str:
    """Cut text to at most max_chars at the last sentence end, else the last space, in the second half."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] > max_chars // 2:
        return head[: ends[-1]].rstrip()
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
    rules = [("entities", data.unescape_entities, "&", unescape_entities),
             ("html", data.strip_html, "<", strip_tags),
             ("boilerplate", content and data.remove_boilerplate, "text refers to", remove_boilerplate)]
    edits: dict[str, list[Edit]] = {}
    for rule, wanted, test, fn in rules:
        if wanted:
            edits[rule] = _edit(texts, [i for i, s in enumerate(texts) if test in s], fn)
    if data.normalize_unicode:
        if to_normalize is None:
            rows = [i for i, s in enumerate(texts) if needs_normalizing(s)]
        else:  # the bulk scan saw the raw text: recheck the rows the rules above changed
            touched = {e[0] for changed in edits.values() for e in changed}
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
        flag = (b < 32) | (b > 126)
        space = b == 32
        flag[1:] |= space[1:] & space[:-1]
        at = np.flatnonzero(flag) + offsets[0]
        rows = np.searchsorted(offsets, at, side="right") - 1
        filled = np.flatnonzero(offsets[1:] > offsets[:-1])
        ends = filled[(data[offsets[filled]] == 32) | (data[offsets[filled + 1] - 1] == 32)]
        found.append(np.union1d(rows, ends) + base)
        base += len(arr)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _edit(texts: list[str], rows: list[int], fn: Any) -> list[Edit]:
    changed: list[Edit] = []
    for i in rows:
        before = texts[i]
        after = fn(before)
        if after != before:
            texts[i] = after
            changed.append((i, before, after) if len(changed) < N_EXAMPLES else (i, "", ""))
    return changed


def clean_text(text: str, data: DataConfig, content: bool = True) -> str:
    """One title or content through the enabled edit rules (clean_chunk does them a column at a time)."""
    texts = [text]
    clean_column(texts, data, content)
    return texts[0]


# ----------------------------------------------------------------------------- reading

RAW_FIELDS = ("uid", "title", "content")
ALPACA_FIELDS = (None, "instruction", "output")  # Alpaca records have no uid: one is made up
_MAX_PENDING = 16 << 20  # a JSON array element longer than this is taken as broken
_BLOCK_BYTES = 4 << 20
_ARROW_THREADS = True  # off in worker processes: they are already one per CPU


@dataclass
class Chunk:
    """Up to chunk_rows raw records: JSON-lines bytes, or objects already decoded (JSON array, hub)."""

    name: str
    fields: tuple[str | None, str, str]
    first_line: int
    blob: bytes | None = b""
    """JSON lines; None when the worker reads them itself from path, offset, nbytes."""
    n_lines: int = 0
    objects: list[tuple[int, str, Any]] | None = None
    """(line or row number, uid to use when the record has none, record)."""
    unit: str = "line"
    path: str | None = None
    offset: int = 0
    nbytes: int = 0
    position: int = 0
    """Bytes of the input read so far (rows, for a hub dataset): drives the progress bar."""
    tail_problem: str | None = None
    """A problem found after this chunk's lines, e.g. where a gzip stream breaks off."""


@dataclass
class Rows:
    """A parsed chunk: parallel lists of raw values, plus the lines that could not be parsed."""

    uids: list[Any] = field(default_factory=list)
    titles: list[Any] = field(default_factory=list)
    contents: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    read: int = 0
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: bool = False
    """Every title and content is a string (and, with drop_missing, not empty)."""
    empty: int = 0
    """Rows with an empty title or content already left out (the fast path does this in bulk)."""
    empty_examples: list[tuple[int, str, str, str]] = field(default_factory=list)
    to_normalize: np.ndarray | None = None
    """Contents that need_normalizing, when the fast path has found them in bulk."""


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _add_object(rows: Rows, chunk: Chunk, line: int, obj: Any, drop_missing: bool, uid_default: str) -> None:
    """Append one decoded record, or record why it cannot be used (naming the file and line)."""
    where = f"{chunk.name} {chunk.unit} {line}"
    if not isinstance(obj, dict):
        rows.bad.append((line, f"{where}: not a JSON object ({_kind(obj)}); skipped", _excerpt(str(obj))))
        return
    uid_key, title_key, content_key = chunk.fields
    values = []
    for key in (title_key, content_key):
        value = obj.get(key)
        if value.__class__ is str:
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    rows.bad.append((line, f"{where}: '{key}' holds an invalid unicode escape (a lone "
                                           "surrogate); skipped", _excerpt(ascii(value))))
                    return
        elif key not in obj or value is None or drop_missing or not isinstance(value, (int, float)):
            what = f"no '{key}' field" if key not in obj else f"'{key}' is {_kind(value)}, not a string"
            rows.problems.append(f"{where}: {what}; {'dropped' if drop_missing else 'kept as text'}")
        values.append(value)
    uid = obj.get(uid_key) if uid_key else None
    rows.uids.append(uid_default if uid is None or uid == "" else str(uid))
    rows.titles.append(values[0])
    rows.contents.append(values[1])
    rows.lines.append(line)


def _parse_arrow(chunk: Chunk, drop_empty: bool) -> Rows | None:
    """The fast path: pyarrow's multi-threaded JSON reader; None when the chunk needs a closer look.

    With drop_empty, rows with an empty title or content (about half of trn.json) are counted and
    left out here, before they cost a Python string each.
    """
    import pyarrow.compute as pc
    import pyarrow.json as pj

    uid_key, title_key, content_key = chunk.fields
    if uid_key is None or chunk.n_lines == 0:
        return None
    schema = pa.schema([(k, pa.string()) for k in chunk.fields])
    try:
        table = pj.read_json(pa.BufferReader(chunk.blob), read_options=pj.ReadOptions(block_size=4 << 20, use_threads=_ARROW_THREADS),
                             parse_options=pj.ParseOptions(explicit_schema=schema,
                                                           unexpected_field_behavior="ignore"))
    except (pa.ArrowException, ValueError):  # bad JSON, a wrong type, bytes that are not UTF-8
        return None
    # Blank lines or nulls: the line-by-line parse gives exact line numbers and messages.
    if table.num_rows != chunk.n_lines or any(table.column(k).null_count for k in chunk.fields):
        return None
    n = table.num_rows
    rows = Rows(read=n, checked=True)
    lines = np.arange(chunk.first_line, chunk.first_line + n)
    if drop_empty:
        empty = pc.or_(pc.equal(pc.binary_length(table.column(title_key)), 0),
                       pc.equal(pc.binary_length(table.column(content_key)), 0))
        rows.empty = pc.sum(empty).as_py() or 0
        if rows.empty:
            first = pc.indices_nonzero(empty)[:N_EXAMPLES].to_pylist()
            rows.empty_examples = [(int(lines[i]), *(table.column(k)[i].as_py() for k in chunk.fields))
                                   for i in first]
            keep = pc.invert(empty)
            table, lines = table.filter(keep), lines[keep.to_numpy(zero_copy_only=False)]
    rows.uids, rows.titles, rows.contents = (table.column(k).to_pylist() for k in chunk.fields)
    rows.lines = lines.tolist()
    rows.to_normalize = rows_to_normalize(table.column(content_key))
    return rows


def parse_chunk(chunk: Chunk, drop_missing: bool = True) -> Rows:
    """Decode a chunk's records; malformed lines are listed, never fatal."""
    if chunk.blob is None:
        with open(chunk.path, "rb") as f:  # type: ignore[arg-type]
            f.seek(chunk.offset)
            chunk.blob = f.read(chunk.nbytes)
    rows = None if chunk.objects is not None else _parse_arrow(chunk, drop_missing)
    if rows is None:
        rows = Rows()
        if chunk.objects is not None:
            for line, uid, obj in chunk.objects:
                rows.read += 1
                _add_object(rows, chunk, line, obj, drop_missing, uid)
        else:
            _parse_lines(rows, chunk, drop_missing)
        rows.problems = [msg for _, msg, _ in rows.bad] + rows.problems if rows.bad else rows.problems
        rows.problems.sort(key=_line_of)
    if chunk.tail_problem:
        rows.problems.append(chunk.tail_problem)
    return rows


def _line_of(message: str) -> int:
    m = re.search(r" line (\d+)", message)
    return int(m.group(1)) if m else 0


def _parse_lines(rows: Rows, chunk: Chunk, drop_missing: bool) -> None:
    parts = chunk.blob.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    for i, raw in enumerate(parts):
        line = chunk.first_line + i
        if not raw.strip():
            continue
        rows.read += 1
        where = f"{chunk.name} line {line}"
        try:
            text = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            rows.bad.append((line, f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                   f"{e.start + 1}); skipped", _excerpt(raw.decode("utf-8", "replace"))))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.bad.append((line, f"{where}: not valid JSON ({e.msg} at column {e.colno}); skipped",
                             _excerpt(text.strip())))
            continue
        _add_object(rows, chunk, line, obj, drop_missing, f"line{line}")


def _open(path: Path) -> tuple[Any, Any]:
    """(raw file, decompressed stream); gzip is recognised by its magic bytes, not the suffix."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise UserError(f"data.raw_path '{path}': cannot read it ({e.strerror}); check the path "
                        "and permissions") from None
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    return raw, raw


_STREAM_ERRORS = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


def _detect_fields(obj: Any) -> tuple[str | None, str, str]:
    if isinstance(obj, dict) and "title" not in obj and "instruction" in obj:
        return ALPACA_FIELDS
    return RAW_FIELDS


def _count_newlines(block: bytes, start: int = 0) -> int:
    return int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8, offset=start) == 10))  # 2x bytes.count


def _nth_newline_end(block: bytes, start: int, k: int) -> int:
    """Index just past the k-th newline of block at or after start."""
    for _ in range(k):
        start = block.index(b"\n", start) + 1
    return start


def read_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    """Stream a JSON-lines file (plain or gzip) or a JSON array as chunks of chunk_rows records.

    This runs in the one process that feeds every worker, so it reads big blocks and counts lines
    in C rather than iterating line by line. A chunk of a plain file is only (offset, length): the
    worker reads its own bytes, and nothing big crosses between processes.
    """
    raw, stream = _open(path)
    compressed = stream is not raw
    with raw, stream:
        broken: BaseException | None = None
        try:
            block = stream.read1(_BLOCK_BYTES)
        except _STREAM_ERRORS as e:
            block, broken = b"", e
        text = block.lstrip(b" \t\r\n\xef\xbb\xbf")
        if text.startswith(b"["):
            yield from _array_chunks(path, [block], stream, chunk_rows, raw)
            return
        try:
            fields = _detect_fields(json.loads(text.split(b"\n", 1)[0]))
        except ValueError:
            fields = RAW_FIELDS

        def chunk(pieces: list[bytes], offset: int, nbytes: int, first_line: int, n_lines: int,
                  tail: str | None = None) -> Chunk:
            if compressed:
                return Chunk(path.name, fields, first_line, b"".join(pieces), n_lines,
                             position=raw.tell(), tail_problem=tail)
            return Chunk(path.name, fields, first_line, None, n_lines, path=str(path), offset=offset,
                         nbytes=nbytes, position=offset + nbytes, tail_problem=tail)

        line_no, count, pieces = 1, 0, []  # count: complete lines since the chunk began
        chunk_start = block_start = 0  # offsets in the (decompressed) stream
        try:
            while block:
                start, n = 0, _count_newlines(block)
                while count + n >= chunk_rows:
                    end = _nth_newline_end(block, start, chunk_rows - count)
                    if compressed:
                        pieces.append(block[start:end])
                    yield chunk(pieces, chunk_start, block_start + end - chunk_start, line_no, chunk_rows)
                    line_no, count, pieces, start = line_no + chunk_rows, 0, [], end
                    chunk_start = block_start + end
                    n = _count_newlines(block, start)
                if compressed and start < len(block):
                    pieces.append(block[start:] if start else block)
                count += n
                block_start += len(block)
                block = stream.read1(_BLOCK_BYTES)
        except _STREAM_ERRORS as e:
            broken = e
        nbytes = block_start - chunk_start
        if broken is not None:  # keep the complete lines; the one cut off is reported
            rest = b"".join(pieces)
            rest = rest[: rest.rfind(b"\n") + 1]
            tail = (f"{path.name} line {line_no + count}: the compressed data ends early or is corrupt "
                    f"({broken}); the {line_no + count - 1} lines before it were kept")
            yield chunk([rest], chunk_start, len(rest), line_no, count, tail)
        elif nbytes:
            last = pieces[-1][-1:] if compressed else _last_byte(path, block_start)
            yield chunk(pieces, chunk_start, nbytes, line_no, count + (last != b"\n"))


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def _array_chunks(path: Path, head: list[bytes], stream: Any, chunk_rows: int, raw: Any) -> Iterator[Chunk]:
    """A JSON array (Alpaca style) decoded element by element, so a large file is never loaded whole."""
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")()
    buf, pos, line, counted = "", 0, 1, 0
    opened = closed = False
    objects: list[tuple[int, str, Any]] = []
    fields: tuple[str | None, str, str] | None = None
    problem, index = None, 0
    blocks = iter(head)
    while not closed and problem is None:
        try:
            block = next(blocks, None)
            if block is None:
                block = stream.read1(_BLOCK_BYTES)
                blocks = iter(())
            text = text_decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            problem = f"not valid UTF-8 ({e.reason}); the rest of the file skipped"
            break
        except _STREAM_ERRORS as e:
            problem = f"the compressed data ends early or is corrupt ({e}); the elements before it were kept"
            break
        buf = buf[pos:] + text
        pos = counted = 0
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in ",\ufeff"):
                pos += 1
            if pos == len(buf):
                break
            if not opened:
                opened, pos = True, pos + 1  # the '['
                continue
            if buf[pos] == "]":
                closed = True
                break
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if block and len(buf) - pos < _MAX_PENDING:
                    break  # most likely cut by the block end: read more
                line += buf.count("\n", counted, pos)
                problem = f"not valid JSON ({e.msg}); the rest of the array skipped"
                break
            line += buf.count("\n", counted, pos)
            counted = pos
            if fields is None:
                fields = _detect_fields(obj)
            objects.append((line, f"item{index}", obj))
            index, pos = index + 1, end
            if len(objects) == chunk_rows:
                yield Chunk(path.name, fields, objects[0][0], objects=objects, position=raw.tell())
                objects = []
        line += buf.count("\n", counted, pos)
        counted = pos
        if not block:
            if not closed and problem is None and opened:
                problem = "the array is not closed with ']'; the elements before it were kept"
            break
    tail = f"{path.name} line {line}: {problem}" if problem else None
    if objects or tail:
        yield Chunk(path.name, fields or RAW_FIELDS, objects[0][0] if objects else line, objects=objects,
                    position=raw.tell(), tail_problem=tail)


def hub_chunks(spec: str, chunk_rows: int) -> Iterator[Chunk]:
    """Stream a Hugging Face dataset ('hf:<id>' or 'hf:<id>:<split>') in chunks of records."""
    ds_id, _, split = spec[3:].partition(":")
    hint = ("download trn.json (see data/README.md) and set data.raw_path to the file"
            if "HF_HUB_OFFLINE" not in os.environ else "HF_HUB_OFFLINE is set: unset it, or use a local file")

    def fail(e: BaseException) -> UserError:
        return UserError(f"data.raw_path '{spec}': could not stream the Hugging Face dataset '{ds_id}' "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}")

    try:
        from datasets import load_dataset

        it = iter(load_dataset(ds_id, split=split or "train", streaming=True))
        objects: list[tuple[int, str, Any]] = []
        fields = None
        for i, row in enumerate(it, 1):
            fields = fields or _detect_fields(row)
            objects.append((i, f"row{i}", row))
            if len(objects) == chunk_rows:
                yield Chunk(spec, fields, objects[0][0], objects=objects, unit="row", position=i)
                objects = []
    except UserError:
        raise
    except Exception as e:  # offline, unknown id, gated, network dropped mid-stream
        raise fail(e) from None
    if objects:
        yield Chunk(spec, fields or RAW_FIELDS, objects[0][0], objects=objects, unit="row",
                    position=objects[-1][0])

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
            self.example(rule, {"line": line, "uid": uid, "title": _excerpt(str(title)),
                                "content": _excerpt(str(content))} | ({"why": why} if why else {}))


def _excerpt(text: str, n: int = EXAMPLE_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _diff_window(before: str, after: str) -> tuple[str, str]:
    """before/after from a little ahead of their first difference, so a change at the end shows."""
    i, limit = 0, min(len(before), len(after))
    while i < limit and before[i] == after[i]:
        i += 1
    start = max(0, i - 60)
    return tuple(("…" if start else "") + _excerpt(s[start:]) for s in (before, after))  # type: ignore[return-value]


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
    title_edits = clean_column(titles, data, content=False)
    content_edits = clean_column(contents, data, content=True, to_normalize=rows.to_normalize)
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
    if data.max_content_chars:
        for i in np.flatnonzero(~drop & (clen > data.max_content_chars)).tolist():
            capped = contents[i] = cap_text(contents[i], data.max_content_chars)
            res.changed["capped"] += 1
            res.example("capped", {"line": lines[i], "uid": uids[i], "chars_before": int(clen[i]),
                                   "chars_after": len(capped), "ends_with": _excerpt(capped[-100:])})
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

def _chunks(source: str, data: DataConfig) -> tuple[Iterator[Chunk], int | None, str]:
    """The input as chunks, its size in bytes (None for a hub dataset) and a description."""
    if source.startswith("hf:"):
        return hub_chunks(source, data.chunk_rows), None, f"Hugging Face dataset {source[3:]}"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.raw_path '{source}' not found; download trn.json (see data/README.md) "
                        "or point data.raw_path at it")
    if path.is_dir():
        raise UserError(f"data.raw_path '{source}' is a folder; give the trn.json file inside it")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"data.raw_path '{source}' is empty (0 bytes); the download may have failed")
    return read_chunks(path, data.chunk_rows), size, str(path)


def _results(chunks: Iterator[Chunk], data: DataConfig, workers: int) -> Iterator[ChunkResult]:
    """Clean chunks in order, in worker processes when workers > 1 (at most 2 chunks ahead each)."""
    if workers <= 1:
        for chunk in chunks:
            yield clean_chunk(chunk, data)
        return
    # fork where there is one: no `if __name__ == "__main__"` guard needed in a user's script, and
    # pyarrow's thread pools are fork-safe (apache/arrow#14594). The warning Python 3.12+ gives
    # about forking a process with threads concerns other libraries' threads, not ours.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pool = multiprocessing.get_context(method).Pool(workers, initializer=_in_worker)
    with pool, tempfile.TemporaryDirectory(prefix="prodtune-clean-", ignore_cleanup_errors=True) as spill:
        pending: deque = deque()
        for k, chunk in enumerate(chunks):
            pending.append(pool.apply_async(_clean_in_worker, (chunk, data, os.path.join(spill, f"{k}.arrow"))))
            if len(pending) >= 2 * workers:
                yield _unspill(pending.popleft().get())
        while pending:
            yield _unspill(pending.popleft().get())


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
    global _ARROW_THREADS
    _ARROW_THREADS = False


def _workers(data: DataConfig, size: int | None) -> int:
    if size is None or size < POOL_MIN_BYTES:
        return 1
    return data.clean_workers or min(4, os.cpu_count() or 1)


def clean_data(data: DataConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Clean data.raw_path into out_dir/clean.parquet (and clean.csv); returns the report (not written)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out_dir = Path(out_dir)
    chunks, size, described = _chunks(data.raw_path, data)
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
            have.append({"line": res.lines[i], "uid": row["uid"], "title": _excerpt(row["title"]),
                         "content": _excerpt(row["content"])})
    # Zero-copy slices between the dropped rows instead of a filter() that copies every string.
    starts = np.concatenate([[0], dup + 1])
    ends = np.concatenate([dup, [res.table.num_rows]])
    return pa.concat_tables([res.table.slice(a, b - a) for a, b in zip(starts, ends) if b > a]
                            or [res.table.slice(0, 0)])


CLEAN_FIELDS = ("raw_path", "drop_missing", "strip_html", "unescape_entities", "normalize_unicode",
                "remove_boilerplate", "min_content_chars", "drop_content_equals_title", "max_content_chars",
                "dedupe", "one_per_title")
MAX_PROBLEMS_KEPT = 1000


def _summary(report: dict[str, Any], paths: RunPaths) -> str:
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
        report["summary"] = _summary(report, paths)
        write_json(tmp / paths.clean_report.name, report)
    return report
