"""What every reader of raw input hands the clean stage: chunks of records, and the rows parsed from them.

rawdata.py reads JSON lines and arrays, tables.py CSV, TSV, parquet and hub datasets; both produce
`Chunk`s, and parsing a chunk gives `Rows` (parallel lists of raw values, with the records that
could not be used listed by line). An opened input is an `Input`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune.chat import first_question, last_answer, parse_conversation
from prodtune.columns import Mapping
from prodtune.errors import UserError
from prodtune.io import excerpt

ARROW_THREADS = True
"""pyarrow's readers use threads; worker processes (already one per CPU) turn this off."""
N_EMPTY_EXAMPLES = 3
"""Rows with an empty title or content kept as examples per chunk (the rest are counted)."""
STREAM_ERRORS = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


@dataclass
class Chunk:
    """Up to chunk_rows raw records: JSON-lines bytes, decoded objects (JSON array, hub) or an Arrow table."""

    name: str
    mapping: Mapping
    first_line: int
    blob: bytes | None = b""
    """JSON lines; None when the worker reads them itself from path, offset, nbytes."""
    n_lines: int = 0
    objects: list[tuple[int, str, Any]] | None = None
    """(line or row number, uid to use when the record has none, record)."""
    table: pa.Table | str | None = None
    """CSV or parquet rows: the mapped columns (prodtune.tables); on its way to a worker process,
    the Arrow file holding them."""
    numbers: np.ndarray | None = None
    """Row number of each table row when they are not consecutive (CSV rows skipped as malformed)."""
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    """Records the reader itself could not use (line, problem, text), e.g. a CSV row with too few fields."""
    lost: int = 0
    """Records known to exist but unreadable (a parquet row group that cannot be decoded): counted as bad."""
    unit: str = "line"
    path: str | None = None
    offset: int = 0
    nbytes: int = 0
    position: int = 0
    """Bytes of the input read so far (rows, for a hub dataset or parquet): drives the progress bar."""
    tail_problem: str | None = None
    """A problem found after this chunk's lines, e.g. where a gzip stream breaks off."""


@dataclass
class Rows:
    """A parsed chunk: parallel lists of raw values, plus the lines that could not be parsed."""

    uids: list[Any] = field(default_factory=list)
    titles: list[Any] = field(default_factory=list)
    contents: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    context: dict[str, list[str | None]] = field(default_factory=dict)
    """Context column -> its value in each row, as text (None: absent, null or empty)."""
    messages: list[list[dict[str, str]] | None] | None = None
    """Conversations (chat input only): messages with normalised roles; None for a row without one."""
    read: int = 0
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    """(line, problem, the line's text) of each record that could not be used at all."""
    lost: int = 0
    """Records that could not even be read one by one (an undecodable parquet row group)."""
    notes: list[tuple[int, str]] = field(default_factory=list)
    """(line, problem) of records kept for the clean rules to judge (a null or a number title)."""
    problems: list[str] = field(default_factory=list)
    """Every problem, in line order (filled by parse_chunk)."""
    checked: bool = False
    """Every title and content is a string (and, with drop_missing, not empty)."""
    empty: int = 0
    """Rows with an empty (or null) title or content already left out (the fast paths do this in bulk)."""
    empty_examples: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    """(line, uid, title, content, why) of the first few of them."""
    arrow: pa.Table | None = None
    """The fast path's (uid, title, content) as Arrow strings, aligned with the lists."""


@dataclass
class Input:
    """An opened input: its chunks, and what is known before reading them."""

    chunks: Iterator[Chunk]
    mapping: Mapping
    format: str
    """'json lines', 'json array', 'csv', 'tsv', 'parquet' or 'hub'."""
    described: str
    size: int | None
    """Bytes of the file (None for a hub dataset): sets how many worker processes clean it."""
    total: int | None
    """Progress bar total in `unit`."""
    unit: str = "B"


def open_raw(path: Any) -> Any:
    """The input file, opened for reading bytes; a UserError naming it and the fix when it cannot be."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"data.raw_path '{path}': cannot read it ({e.strerror}); check the path "
                        "and permissions") from None


def uid_or(value: Any, default: str) -> str:
    """A record's uid as text, or `default` (the line or row it came from) when it has none or an empty one."""
    return default if value is None or value == "" else str(value)


def lone_surrogate(value: str) -> bool:
    """True when a string holds a lone surrogate (an invalid unicode escape), which UTF-8 cannot encode."""
    if value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def add_conversation(rows: Rows, where: str, line: int, obj: dict, key: str, uid: Any, uid_default: str) -> None:
    """Append one chat record: its messages, first user message (title) and last answer (content)."""
    value = obj.get(key)
    messages = None
    if value is None:
        rows.notes.append((line, f"{where}: {'no' if key not in obj else 'a null'} '{key}' field; dropped"))
    else:
        messages, why = parse_conversation(value)
        if messages is not None and any(lone_surrogate(m["content"]) for m in messages):
            messages, why = None, "holds an invalid unicode escape (a lone surrogate)"
        if messages is None:
            text = json.dumps(value, ensure_ascii=True, default=str)
            rows.bad.append((line, f"{where}: '{key}' {why}; skipped", excerpt(text)))
            return
    rows.uids.append(uid_or(uid, uid_default))
    rows.lines.append(line)
    rows.messages.append(messages)  # type: ignore[union-attr]
    rows.titles.append(first_question(messages) if messages else None)
    k = last_answer(messages) if messages else None
    rows.contents.append(messages[k]["content"] if k is not None else None)  # type: ignore[index]
