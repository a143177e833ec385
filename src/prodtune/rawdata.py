"""Reading the raw input for the clean stage, in chunks: trn.json lines, gzip, Alpaca arrays, the hub.

    chunks, size, described = open_chunks("data/trn.json.gz", chunk_rows=50_000)
    rows = parse_chunk(next(chunks))      # uids, titles, contents, lines; bad lines listed

Formats: JSON lines (.json/.jsonl; gzip is recognised by its magic bytes, whatever the name), an
Alpaca-style JSON array (`instruction`/`output`; uids are made up), and `hf:<dataset id>` streamed
with datasets. Memory is bounded by the chunk, never by the file. A chunk of JSON lines is parsed
with pyarrow's JSON reader; if anything in it is off (bad JSON, a wrong type, a null, a blank
line) that chunk alone is parsed line by line, which names the file and line of each problem.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune.errors import UserError
from prodtune.io import excerpt

ARROW_THREADS = True
"""pyarrow's JSON reader uses threads; worker processes (already one per CPU) turn this off."""
RAW_FIELDS = ("uid", "title", "content")
ALPACA_FIELDS = (None, "instruction", "output")  # Alpaca records have no uid: one is made up
_MAX_PENDING = 16 << 20  # a JSON array element longer than this is taken as broken
_BLOCK_BYTES = 4 << 20
_N_EMPTY_EXAMPLES = 3
_STREAM_ERRORS = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


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
    """(line, problem, the line's text) of each record that could not be used at all."""
    notes: list[tuple[int, str]] = field(default_factory=list)
    """(line, problem) of records kept for the clean rules to judge (a null or a number title)."""
    problems: list[str] = field(default_factory=list)
    """Every problem, in line order (filled by parse_chunk)."""
    checked: bool = False
    """Every title and content is a string (and, with drop_missing, not empty)."""
    empty: int = 0
    """Rows with an empty title or content already left out (the fast path does this in bulk)."""
    empty_examples: list[tuple[int, str, str, str]] = field(default_factory=list)
    arrow: pa.Table | None = None
    """The fast path's (uid, title, content) as Arrow strings, aligned with the lists."""


def open_chunks(source: str, chunk_rows: int) -> tuple[Iterator[Chunk], int | None, str]:
    """The input as chunks, its size in bytes (None for a hub dataset) and a description.

    A missing input, a folder or an empty file is one UserError here, before anything is written.
    """
    if source.startswith("hf:"):
        return hub_chunks(source, chunk_rows), None, f"Hugging Face dataset {source[3:]}"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.raw_path '{source}' not found; download trn.json (see data/README.md) "
                        "or point data.raw_path at it")
    if path.is_dir():
        raise UserError(f"data.raw_path '{source}' is a folder; give the trn.json file inside it")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"data.raw_path '{source}' is empty (0 bytes); the download may have failed")
    return read_chunks(path, chunk_rows), size, str(path)


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
            last = pieces[-1][-1:] if compressed else _read_range(path, block_start - 1, 1)
            yield chunk(pieces, chunk_start, nbytes, line_no, count + (last != b"\n"))


def _read_range(path: str | Path, offset: int, n: int) -> bytes:
    if hasattr(os, "pread"):  # a third of the CPU time of a buffered read of tens of MB
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, n, offset)
        finally:
            os.close(fd)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


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
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = ("HF_HUB_OFFLINE is set: unset it, or use a local file" if offline
            else "download trn.json (see data/README.md) and set data.raw_path to the file")

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


# ----------------------------------------------------------------------------- parsing a chunk

def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _add_object(rows: Rows, chunk: Chunk, line: int, obj: Any, drop_missing: bool, uid_default: str) -> None:
    """Append one decoded record, or record why it cannot be used (naming the file and line)."""
    where = f"{chunk.name} {chunk.unit} {line}"
    if not isinstance(obj, dict):
        rows.bad.append((line, f"{where}: not a JSON object ({_kind(obj)}); skipped", excerpt(str(obj))))
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
                                           "surrogate); skipped", excerpt(ascii(value))))
                    return
        else:
            what = f"no '{key}' field" if key not in obj else f"'{key}' is {_kind(value)}, not a string"
            rows.notes.append((line, f"{where}: {what}; {'dropped' if drop_missing else 'kept as text'}"))
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
        table = pj.read_json(pa.BufferReader(chunk.blob),
                             read_options=pj.ReadOptions(block_size=_BLOCK_BYTES, use_threads=ARROW_THREADS),
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
            first = pc.indices_nonzero(empty)[:_N_EMPTY_EXAMPLES].to_pylist()
            rows.empty_examples = [(int(lines[i]), *(table.column(k)[i].as_py() for k in chunk.fields))
                                   for i in first]
            keep = pc.invert(empty)
            table, lines = table.filter(keep), lines[keep.to_numpy(zero_copy_only=False)]
    rows.uids, rows.titles, rows.contents = (table.column(k).to_pylist() for k in chunk.fields)
    rows.lines = lines.tolist()
    rows.arrow = table
    return rows


def parse_chunk(chunk: Chunk, drop_missing: bool = True) -> Rows:
    """Decode a chunk's records; malformed lines are listed, never fatal."""
    if chunk.blob is None:
        chunk.blob = _read_range(chunk.path, chunk.offset, chunk.nbytes)  # type: ignore[arg-type]
    rows = None if chunk.objects is not None else _parse_arrow(chunk, drop_missing)
    if rows is None:
        rows = Rows()
        if chunk.objects is not None:
            for line, uid, obj in chunk.objects:
                rows.read += 1
                _add_object(rows, chunk, line, obj, drop_missing, uid)
        else:
            _parse_lines(rows, chunk, drop_missing)
        rows.problems = [msg for _, msg in sorted([(line, msg) for line, msg, _ in rows.bad] + rows.notes)]
    if chunk.tail_problem:
        rows.problems.append(chunk.tail_problem)
    return rows


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
                                   f"{e.start + 1}); skipped", excerpt(raw.decode("utf-8", "replace"))))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.bad.append((line, f"{where}: not valid JSON ({e.msg} at column {e.colno}); skipped",
                             excerpt(text.strip())))
            continue
        _add_object(rows, chunk, line, obj, drop_missing, f"line{line}")
