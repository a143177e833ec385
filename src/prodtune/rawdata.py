"""Reading the raw input for the clean stage, in chunks: JSON lines, JSON arrays, CSV/TSV, parquet, the hub.

    source = open_input(data)                 # the format, the column mapping, and the chunks
    rows = parse_chunk(next(source.chunks))   # uids, titles, contents, context, lines; bad records listed

Formats: JSON lines (.json/.jsonl) and a JSON array (Alpaca style), read here; CSV/TSV, parquet
and `hf:<dataset id>[:<config>][:<split>]` (a Hugging Face dataset, streamed), read by
prodtune.tables; each file gzip-compressed or not (gzip is recognised by its magic bytes,
whatever the name). Memory is bounded by the chunk, never by the file. A chunk of JSON lines is parsed with pyarrow's JSON reader; if anything
in it is off (bad JSON, a wrong type, a null, a blank line) that chunk alone is parsed line by
line, which names the file and line of each problem.

Which columns hold what is a `Mapping`, resolved once from data.title_field, content_field,
id_field, context_fields and chat_field and the input's own columns: keys left unset fall back to
trn.json's names (uid/title/content), Alpaca's (instruction/output, with `input` as context), or
a conversation column (messages / conversations).
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune import chunks, tables
from prodtune.chunks import (N_EMPTY_EXAMPLES, STREAM_ERRORS, Chunk, Input, Rows, add_conversation,
                             lone_surrogate, uid_or)
from prodtune.chat import json_kind
from prodtune.columns import Mapping, context_text, resolve_mapping
from prodtune.config import DataConfig
from prodtune.errors import UserError
from prodtune.io import excerpt

_MAX_PENDING = 16 << 20  # a JSON array element longer than this is taken as broken
_BLOCK_BYTES = 4 << 20
_HEAD_RECORDS = 100  # records looked at to learn a JSON file's keys ...
_HEAD_BYTES = 1 << 20  # ... within its first MiB


def open_input(data: DataConfig) -> Input:
    """The input named by data.raw_path, its mapping resolved and its chunks ready to stream.

    A missing input, a folder, an empty file, a name that contradicts the content or a mapped
    column that does not exist is one UserError here, before anything is written.
    """
    source = data.raw_path
    if source.startswith("hf:"):
        return tables.hub_input(data)

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.raw_path '{source}' not found; download trn.json (see data/README.md) "
                        "or point data.raw_path at your own file")
    if path.is_dir():
        raise UserError(f"data.raw_path '{source}' is a folder; give the file inside it")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"data.raw_path '{source}' is empty (0 bytes); the download may have failed")
    fmt = tables.detect_format(path)
    if fmt in ("csv", "tsv", "parquet"):
        return tables.open_table(path, fmt, data, size)
    is_array, head = _json_head(path)
    columns = list(dict.fromkeys(k for r in head if isinstance(r, dict) for k in r)) if head else None
    mapping = resolve_mapping(data, columns, path.name, f"keys in the first {len(head)} records")
    if is_array:
        return Input(_array_chunks(path, data.chunk_rows, mapping), mapping, "json array", str(path), size, size)
    return Input(read_chunks(path, data.chunk_rows, mapping), mapping, "json lines", str(path), size, size)


# ----------------------------------------------------------------------------- JSON

def _open(path: Path) -> tuple[Any, Any]:
    """(raw file, decompressed stream); gzip is recognised by its magic bytes, not the suffix."""
    raw = chunks.open_raw(path)
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    return raw, raw


def _json_head(path: Path) -> tuple[bool, list[Any]]:
    """(is it a JSON array, its first records that parse): to learn the keys before streaming."""
    raw, stream = _open(path)
    with raw, stream:
        try:
            block = stream.read(_HEAD_BYTES)
        except STREAM_ERRORS:
            block = b""
    text = block.decode("utf-8", "replace").lstrip(" \t\r\n\ufeff")
    records: list[Any] = []
    if text.startswith("["):
        decoder, pos = json.JSONDecoder(), 1
        while len(records) < _HEAD_RECORDS:
            while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
                pos += 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                break
            records.append(obj)
        return True, records
    for line in text.split("\n")[:_HEAD_RECORDS]:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return False, records


def _count_newlines(block: bytes, start: int = 0) -> int:
    return int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8, offset=start) == 10))  # 2x bytes.count


def _nth_newline_end(block: bytes, start: int, k: int) -> int:
    """Index just past the k-th newline of block at or after start."""
    for _ in range(k):
        start = block.index(b"\n", start) + 1
    return start


def read_chunks(path: Path, chunk_rows: int, mapping: Mapping) -> Iterator[Chunk]:
    """Stream a JSON-lines file (plain or gzip) as chunks of chunk_rows records.

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
        except STREAM_ERRORS as e:
            block, broken = b"", e

        def chunk(pieces: list[bytes], offset: int, nbytes: int, first_line: int, n_lines: int,
                  tail: str | None = None) -> Chunk:
            if compressed:
                return Chunk(path.name, mapping, first_line, b"".join(pieces), n_lines,
                             position=raw.tell(), tail_problem=tail)
            return Chunk(path.name, mapping, first_line, None, n_lines, path=str(path), offset=offset,
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
        except STREAM_ERRORS as e:
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


def _array_chunks(path: Path, chunk_rows: int, mapping: Mapping) -> Iterator[Chunk]:
    """A JSON array (Alpaca style) decoded element by element, so a large file is never loaded whole."""
    raw, stream = _open(path)
    with raw, stream:
        yield from _array_elements(path, stream, chunk_rows, raw, mapping)


def _array_elements(path: Path, stream: Any, chunk_rows: int, raw: Any, mapping: Mapping) -> Iterator[Chunk]:
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")()
    buf, pos, line, counted = "", 0, 1, 0
    opened = closed = False
    objects: list[tuple[int, str, Any]] = []
    problem, index = None, 0
    while not closed and problem is None:
        try:
            block = stream.read1(_BLOCK_BYTES)
            text = text_decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            problem = f"not valid UTF-8 ({e.reason}); the rest of the file skipped"
            break
        except STREAM_ERRORS as e:
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
            objects.append((line, f"item{index}", obj))
            index, pos = index + 1, end
            if len(objects) == chunk_rows:
                yield Chunk(path.name, mapping, objects[0][0], objects=objects, position=raw.tell())
                objects = []
        line += buf.count("\n", counted, pos)
        counted = pos
        if not block:
            if not closed and problem is None and opened:
                problem = "the array is not closed with ']'; the elements before it were kept"
            break
    tail = f"{path.name} line {line}: {problem}" if problem else None
    if objects or tail:
        yield Chunk(path.name, mapping, objects[0][0] if objects else line, objects=objects,
                    position=raw.tell(), tail_problem=tail)


# ----------------------------------------------------------------------------- parsing a chunk

def _add_object(rows: Rows, chunk: Chunk, line: int, obj: Any, drop_missing: bool, uid_default: str) -> None:
    """Append one decoded record, or record why it cannot be used (naming the file and line)."""
    where = f"{chunk.name} {chunk.unit} {line}"
    if not isinstance(obj, dict):
        rows.bad.append((line, f"{where}: not a JSON object ({json_kind(obj)}); skipped", excerpt(str(obj))))
        return
    m = chunk.mapping
    if m.chat:
        add_conversation(rows, where, line, obj, m.chat, obj.get(m.uid) if m.uid else None, uid_default)
        return
    values = []
    for key in (m.title, m.content):
        value = obj.get(key)
        if value.__class__ is str:
            if lone_surrogate(value):
                rows.bad.append((line, f"{where}: '{key}' holds an invalid unicode escape (a lone "
                                       "surrogate); skipped", excerpt(ascii(value))))
                return
        else:
            what = f"no '{key}' field" if key not in obj else f"'{key}' is {json_kind(value)}, not a string"
            rows.notes.append((line, f"{where}: {what}; {'dropped' if drop_missing else 'kept as text'}"))
        values.append(value)
    uid = obj.get(m.uid) if m.uid else None
    rows.uids.append(uid_or(uid, uid_default))
    rows.titles.append(values[0])
    rows.contents.append(values[1])
    rows.lines.append(line)
    for name in m.context:
        rows.context.setdefault(name, []).append(context_text(obj.get(name)))


def _parse_arrow(chunk: Chunk, drop_empty: bool) -> Rows | None:
    """The fast path: pyarrow's multi-threaded JSON reader; None when the chunk needs a closer look.

    With drop_empty, rows with an empty title or content (about half of trn.json) are counted and
    left out here, before they cost a Python string each. Context columns must be strings here.
    """
    import pyarrow.compute as pc
    import pyarrow.json as pj

    m = chunk.mapping
    if m.chat or chunk.n_lines == 0:
        return None
    keys = [k for k in (m.uid, m.title, m.content) if k]
    schema = pa.schema([(k, pa.string()) for k in dict.fromkeys([*keys, *m.context])])
    try:
        table = pj.read_json(pa.BufferReader(chunk.blob),
                             read_options=pj.ReadOptions(block_size=_BLOCK_BYTES, use_threads=chunks.ARROW_THREADS),
                             parse_options=pj.ParseOptions(explicit_schema=schema,
                                                           unexpected_field_behavior="ignore"))
    except (pa.ArrowException, ValueError):  # bad JSON, a wrong type, bytes that are not UTF-8
        return None
    # Blank lines or nulls: the line-by-line parse gives exact line numbers and messages; an empty
    # uid gets its line's, as there.
    if table.num_rows != chunk.n_lines or any(table.column(k).null_count for k in keys):
        return None
    if m.uid and pc.any(pc.equal(table.column(m.uid), "")).as_py():
        return None
    n = table.num_rows
    rows = Rows(read=n, checked=True)
    lines = np.arange(chunk.first_line, chunk.first_line + n)
    if m.uid is None:
        table = table.append_column("\0uid", pa.array([f"line{i}" for i in lines.tolist()], pa.string()))
    uid_key = m.uid or "\0uid"
    if drop_empty:
        empty = pc.or_(pc.equal(pc.binary_length(table.column(m.title)), 0),
                       pc.equal(pc.binary_length(table.column(m.content)), 0))
        rows.empty = pc.sum(empty).as_py() or 0
        if rows.empty:
            first = pc.indices_nonzero(empty)[:N_EMPTY_EXAMPLES].to_pylist()
            rows.empty_examples = [(int(lines[i]), *(table.column(k)[i].as_py() for k in (uid_key, m.title, m.content)),
                                    "empty") for i in first]
            keep = pc.invert(empty)
            table, lines = table.filter(keep), lines[keep.to_numpy(zero_copy_only=False)]
    rows.uids, rows.titles, rows.contents = (table.column(k).to_pylist() for k in (uid_key, m.title, m.content))
    rows.context = {name: [v or None for v in table.column(name).to_pylist()] for name in m.context}
    rows.lines = lines.tolist()
    rows.arrow = pa.table([table.column(k) for k in (uid_key, m.title, m.content)], names=["uid", "title", "content"])
    return rows


def parse_chunk(chunk: Chunk, drop_missing: bool = True) -> Rows:
    """Decode a chunk's records; malformed ones are listed, never fatal."""
    if chunk.table is not None:
        rows = tables.table_rows(chunk, drop_missing)
    else:
        if chunk.blob is None:
            chunk.blob = _read_range(chunk.path, chunk.offset, chunk.nbytes)  # type: ignore[arg-type]
        rows = None if chunk.objects is not None else _parse_arrow(chunk, drop_missing)
        if rows is None:
            rows = Rows(messages=[] if chunk.mapping.chat else None)
            if chunk.objects is not None:
                for line, uid, obj in chunk.objects:
                    rows.read += 1
                    _add_object(rows, chunk, line, obj, drop_missing, uid)
            else:
                _parse_lines(rows, chunk, drop_missing)
    if rows.bad or rows.notes:
        rows.problems = [msg for _, msg in sorted([(line, msg) for line, msg, _ in rows.bad] + rows.notes)]
    if chunk.tail_problem:
        rows.problems.append(chunk.tail_problem)
    for name in chunk.mapping.context:  # a chunk without a single usable record
        rows.context.setdefault(name, [None] * len(rows.uids))
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
