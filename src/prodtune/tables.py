"""CSV, TSV, parquet and hub-dataset input for the clean stage, streamed in chunks.

    fmt = detect_format(Path("shop.csv.gz"))          # 'csv': the name and the first bytes agree
    source = open_table(path, fmt, data, size)        # chunks.Input: mapping resolved, chunks ready

CSV is read with pyarrow.csv.open_csv (a block at a time; quoted newlines allowed; a row with the
wrong number of fields is skipped and listed), parquet with ParquetFile.iter_batches (a batch at a
time, only the mapped columns; a row group that cannot be decoded is skipped and counted), a
Hugging Face dataset (`hf:owner/name[:config][:split]`) with datasets' streaming mode. Every
mapped CSV column is read as text, so a column of numbers never changes type between blocks.
`table_rows` turns a chunk into chunks.Rows with the type, null and empty checks done in bulk.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune import chunks
from prodtune.chunks import Chunk, Input, Rows
from prodtune.columns import Mapping, context_text, resolve_mapping
from prodtune.config import DataConfig
from prodtune.errors import UserError
from prodtune.io import excerpt

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
            ".json": "json", ".jsonl": "json", ".ndjson": "json"}
NAMES = {"csv": "CSV", "tsv": "TSV", "parquet": "parquet", "json": "JSON"}
_CSV_BLOCK = 1 << 20
_HEAD = 64 << 10
_DELIMITERS = ",;\t|"


# ----------------------------------------------------------------------------- what the file is

def _content_kind(head: bytes) -> str:
    """What the first bytes look like: parquet, json, text, zip, binary or empty."""
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    text = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    if not text:
        return "empty"
    if text[:1] in (b"{", b"["):
        return "json"
    return "binary" if b"\0" in head[:4096] else "text"


def _head(path: Path) -> tuple[bytes, bool]:
    """The first bytes of the file, decompressed when it is gzip, and whether it is."""
    with chunks.open_raw(path) as f:
        head = f.read(_HEAD)
        if not head.startswith(b"\x1f\x8b"):
            return head, False
        f.seek(0)
        try:
            return gzip.GzipFile(fileobj=f, mode="rb").read1(_HEAD), True
        except chunks.STREAM_ERRORS:  # a corrupt stream: the reader names where it breaks
            return b"", True


def detect_format(path: Path) -> str:
    """'json', 'csv', 'tsv' or 'parquet', from the name and the first bytes; a UserError when they disagree."""
    name = path.name.lower()
    for gz in (".gz", ".gzip"):
        name = name.removesuffix(gz)
    by_name = SUFFIXES.get(Path(name).suffix)
    head, gzipped = _head(path)
    kind = _content_kind(head)
    where = f"data.raw_path '{path}'"
    if kind == "zip":
        raise UserError(f"{where} is a zip archive (an Excel .xlsx file is one): unzip it, or export the "
                        "sheet as CSV")
    if kind == "parquet" and gzipped:
        raise UserError(f"{where} is a gzip-compressed parquet file: decompress it (gunzip); parquet "
                        "compresses its own columns")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        raise UserError(f"{where} is UTF-16 or UTF-32 text (it starts with that byte-order mark); save it as "
                        "UTF-8 (e.g. iconv -f UTF-16 -t UTF-8), the encoding prodtune reads")
    if kind == "binary" and by_name != "parquet":
        raise UserError(f"{where} is not text (it has NUL bytes) nor parquet: give a CSV, TSV, JSON lines, "
                        "JSON or parquet file")
    said = f"the name says {NAMES[by_name]} ({path.suffix})" if by_name else ""
    start = excerpt(head[:60].decode("utf-8", "replace"), 40)
    looks = {"parquet": "parquet (it starts with PAR1)", "json": "JSON (it starts with '{' or '[')",
             "text": f"delimited text such as CSV (it starts with {start!r})",
             "binary": "binary data, not parquet (no PAR1 at its start)"}.get(kind)
    clash = (by_name == "parquet" and kind != "parquet"
             or by_name in ("csv", "tsv") and kind in ("parquet", "json")
             or by_name == "json" and kind in ("parquet", "text"))
    if clash and looks:
        raise UserError(f"{where}: {said} but the content is {looks}; rename the file to match its content "
                        "or point data.raw_path at the right file")
    if by_name:
        return by_name
    if kind in ("parquet", "json"):
        return kind
    if kind == "empty":
        return "json"  # the JSON reader says there is nothing to clean
    return "tsv" if _delimiter(head, "csv") == "\t" else "csv"


def _delimiter(head: bytes, fmt: str) -> str:
    """Tab for TSV; for CSV the most frequent of , ; tab | in the header line (',' when none)."""
    if fmt == "tsv":
        return "\t"
    line = head.decode("utf-8", "replace").lstrip("\ufeff").split("\n", 1)[0]
    counts = {d: line.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


# ----------------------------------------------------------------------------- opening

class _EndAtBreak(io.RawIOBase):
    """A decompressed stream that ends where the compressed data breaks off, keeping the error, so
    that pyarrow keeps the rows before the break instead of failing the whole read. It passes on
    whole lines only: the line the break cuts in two is dropped, never read as a shorter row."""

    def __init__(self, stream: Any):
        self.stream, self.error, self.held = stream, None, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = b""
        while not data and self.error is None:
            try:
                block = self.stream.read1(max(len(buffer) - len(self.held), 1))
            except chunks.STREAM_ERRORS as e:
                self.error, self.held = e, b""  # the cut line goes
                break
            if not block:  # the end of a sound stream: the last line, newline or not
                data, self.held = self.held, b""
                break
            block = self.held + block
            end = block.rfind(b"\n") + 1
            data, self.held = block[:end], block[end:]
        buffer[:len(data)] = data
        return len(data)


def _open_text(path: Path, gz: bool) -> tuple[Any, Any, _EndAtBreak | None]:
    """(raw file, what pyarrow reads, the break-catching stream when gzip)."""
    raw = chunks.open_raw(path)
    if not gz:
        return raw, raw, None
    safe = _EndAtBreak(gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw, pa.PythonFile(io.BufferedReader(safe, _CSV_BLOCK), mode="r"), safe


def _csv_options(delimiter: str, columns: list[str] | None, on_invalid: Any) -> dict[str, Any]:
    import pyarrow.csv as pacsv

    convert = (pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                    check_utf8=False, strings_can_be_null=False)
               if columns is not None else pacsv.ConvertOptions(column_types={}, check_utf8=False))
    # use_threads=False: the rows skipped as malformed come with their row number only when serial.
    return dict(read_options=pacsv.ReadOptions(use_threads=False, block_size=_CSV_BLOCK),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                                 invalid_row_handler=on_invalid),
                convert_options=convert)


def open_table(path: Path, fmt: str, data: DataConfig, size: int) -> Input:
    """A CSV, TSV or parquet file as chunks.Input: its columns checked against the mapping first."""
    if fmt == "parquet":
        pf = _parquet_file(path)
        mapping = resolve_mapping(data, pf.schema_arrow.names, path.name)
        total = pf.metadata.num_rows
        return Input(_parquet_chunks(path, pf, mapping, data.chunk_rows), mapping, "parquet",
                     f"{path} (parquet, {total:,} rows in {pf.num_row_groups} row groups)", size, total, " rows")
    head, gz = _head(path)
    delimiter = _delimiter(head, fmt)
    mapping = resolve_mapping(data, _csv_header(path, gz, delimiter), path.name)
    shown = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}[delimiter]
    return Input(_csv_chunks(path, gz, delimiter, mapping, data.chunk_rows), mapping, fmt,
                 f"{path} ({NAMES[fmt]}, {shown}-separated{', gzip' if gz else ''})", size, size)


def _csv_header(path: Path, gz: bool, delimiter: str) -> list[str]:
    import pyarrow.csv as pacsv

    raw, stream, _ = _open_text(path, gz)
    with raw:
        try:
            reader = pacsv.open_csv(stream, **_csv_options(delimiter, None, lambda row: "skip"))
        except (pa.ArrowException, OSError, EOFError) as e:
            raise UserError(f"data.raw_path '{path}': its header cannot be read as CSV ({str(e).splitlines()[0]})"
                            "; check that it is UTF-8 text with a header line") from None
        return reader.schema.names


def _csv_chunks(path: Path, gz: bool, delimiter: str, mapping: Mapping, chunk_rows: int) -> Iterator[Chunk]:
    """Stream the mapped columns in chunks of chunk_rows rows; row numbers count data rows from 1."""
    import pyarrow.csv as pacsv

    skipped: list[tuple[int, str, str]] = []  # reported with the next chunk
    gaps: list[int] = []  # numbers of every skipped row not yet passed, for numbering the rows kept

    def on_invalid(row: Any) -> str:
        number = (row.number or 0) - 1  # pyarrow counts the header as row 1
        gaps.append(number)
        skipped.append((number, f"{path.name} row {number}: {row.actual_columns} fields instead of "
                                f"{row.expected_columns}; skipped", excerpt(row.text)))
        return "skip"

    raw, stream, safe = _open_text(path, gz)
    with raw:
        reader = pacsv.open_csv(stream, **_csv_options(delimiter, mapping.columns, on_invalid))
        batches: list[Any] = []
        numbers: list[np.ndarray] = []
        pending, record, problem = 0, 1, None
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowException, OSError, EOFError) as e:  # after the gzip break, or bad quoting
                problem = f"cannot be parsed after data row {record - 1} ({str(e).splitlines()[0]})"
                break
            n = batch.num_rows
            at = np.arange(record, record + n + len(gaps))
            at = at[~np.isin(at, gaps)][:n] if gaps else at
            if n:
                record = int(at[-1]) + 1
                gaps[:] = [g for g in gaps if g >= record]
            batches.append(batch)
            numbers.append(at)
            pending += n
            while pending >= chunk_rows:
                yield _table_chunk(path, mapping, batches, numbers, chunk_rows, skipped, raw.tell())
                pending -= chunk_rows
        if safe is not None and safe.error is not None:
            problem = (f"the compressed data ends early or is corrupt ({safe.error}) after data row {record - 1}; "
                       "the rows before it were kept")
        tail = f"{path.name} row {record}: {problem}" if problem else None
        if pending or skipped or tail:
            yield _table_chunk(path, mapping, batches, numbers, pending, skipped, raw.tell(), tail)


def _table_chunk(path: Path, mapping: Mapping, batches: list[Any], numbers: list[np.ndarray], n: int,
                 skipped: list[tuple[int, str, str]], position: int, tail: str | None = None) -> Chunk:
    """The first n pending rows as one chunk (batches and numbers keep the rest), with the rows
    skipped so far."""
    table = pa.Table.from_batches(batches, schema=batches[0].schema) if batches else _empty(mapping)
    at = np.concatenate(numbers) if numbers else np.empty(0, dtype=np.int64)
    rest, rest_at = table.slice(n), at[n:]
    batches[:] = rest.to_batches() if rest.num_rows else []
    numbers[:] = [rest_at] if len(rest_at) else []
    at = at[:n]
    consecutive = not len(at) or at[-1] - at[0] == len(at) - 1
    bad, skipped[:] = list(skipped), []
    return Chunk(path.name, mapping, int(at[0]) if len(at) else 1, table=table.slice(0, n).combine_chunks(),
                 numbers=None if consecutive else at, bad=bad, unit="row", position=position, tail_problem=tail)


def _empty(mapping: Mapping) -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in mapping.columns})


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        # A buffered stream reads a column chunk a page at a time instead of whole (bounded memory).
        return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"data.raw_path '{path}': not a readable parquet file ({str(e).splitlines()[0]}); "
                        "it may be cut short (a parquet file ends with its footer): copy or export it again") from None


def _parquet_chunks(path: Path, pf: Any, mapping: Mapping, chunk_rows: int) -> Iterator[Chunk]:
    """Row group by row group, a batch at a time; a row group that cannot be decoded is skipped,
    its rows counted, and the next one read."""
    groups, start = pf.num_row_groups, 1  # start: number of the row group's first row
    batches: list[Any] = []
    numbers: list[np.ndarray] = []
    pending = 0
    for g in range(groups):
        n_group, done = pf.metadata.row_group(g).num_rows, 0
        try:
            for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=[g], columns=mapping.columns,
                                         use_threads=chunks.ARROW_THREADS):
                batches.append(batch)
                numbers.append(np.arange(start + done, start + done + batch.num_rows))
                done += batch.num_rows
                pending += batch.num_rows
                while pending >= chunk_rows:
                    yield _table_chunk(path, mapping, batches, numbers, chunk_rows, [], start + done - 1)
                    pending -= chunk_rows
        except (pa.ArrowException, OSError) as e:
            problem = (f"{path.name} rows {start + done}-{start + n_group - 1} (row group {g + 1} of {groups}): "
                       f"cannot be read ({str(e).splitlines()[0]}); skipped")
            chunk = Chunk(path.name, mapping, start + done, table=_empty(mapping), unit="row",
                          position=start + n_group - 1, tail_problem=problem, lost=n_group - done)
            if pending:
                yield _table_chunk(path, mapping, batches, numbers, pending, [], start + done - 1)
                pending = 0
            yield chunk
        start += n_group
    if pending:
        yield _table_chunk(path, mapping, batches, numbers, pending, [], start - 1)


# ----------------------------------------------------------------------------- the hub

def _hub_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:owner/name[:config][:split]' -> (dataset id, config or None, split, 'train' by default)."""
    parts = spec[3:].split(":")
    if len(parts) > 3 or not all(parts):
        raise UserError(f"data.raw_path '{spec}': write hf:<owner/name>, hf:<owner/name>:<split> or "
                        "hf:<owner/name>:<config>:<split>")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"


def hub_input(data: DataConfig) -> Input:
    """Stream a Hugging Face dataset; its first row tells the columns before any chunk is read."""
    spec = data.raw_path
    ds_id, config, split = _hub_spec(spec)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = ("HF_HUB_OFFLINE is set: unset it, or use a local file" if offline
            else "check the id and your connection, or download the data and set data.raw_path to the file")

    def fail(e: BaseException) -> UserError:
        return UserError(f"data.raw_path '{spec}': could not stream the Hugging Face dataset '{ds_id}' "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}")

    try:
        from datasets import load_dataset

        it = iter(load_dataset(ds_id, name=config, split=split, streaming=True))
        first = next(it, None)
    except Exception as e:  # offline, unknown id or split, gated
        raise fail(e) from None
    mapping = resolve_mapping(data, list(first) if isinstance(first, dict) else None, spec)
    described = f"Hugging Face dataset {ds_id}" + (f" ({config})" if config else "") + f", split {split}"
    stream = _hub_chunks(spec, first, it, data.chunk_rows, mapping, fail)
    return Input(stream, mapping, "hub", described, None, None, " rows")


def _hub_chunks(spec: str, first: Any, it: Iterator[Any], chunk_rows: int, mapping: Mapping,
                fail: Any) -> Iterator[Chunk]:
    if first is None:
        return
    objects: list[tuple[int, str, Any]] = [(1, "row1", first)]
    i = 1
    try:
        for i, row in enumerate(it, 2):
            if len(objects) == chunk_rows:
                yield Chunk(spec, mapping, objects[0][0], objects=objects, unit="row", position=i - 1)
                objects = []
            objects.append((i, f"row{i}", row))
    except Exception as e:  # the network dropped mid-stream
        raise fail(e) from None
    yield Chunk(spec, mapping, objects[0][0], objects=objects, unit="row", position=i)


# ----------------------------------------------------------------------------- rows of a chunk

def _is_text(col: Any) -> bool:
    return pa.types.is_string(col.type) or pa.types.is_large_string(col.type)


def _bad_utf8(table: pa.Table, columns: list[str]) -> list[tuple[int, str]]:
    """(row index, column) of values that are not valid UTF-8 (CSV text is read unchecked, for speed)."""
    found = []
    for name in columns:
        col = table.column(name)
        if not _is_text(col):
            continue
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            for i, b in enumerate(col.cast(pa.binary()).to_pylist()):
                try:
                    b is None or b.decode("utf-8")
                except UnicodeDecodeError:
                    found.append((i, name))
    return found


def table_rows(chunk: Chunk, drop_missing: bool) -> Rows:
    """A CSV or parquet chunk as Rows: nulls, empties and columns of the wrong type counted in bulk."""
    import pyarrow.compute as pc

    table, m = chunk.table, chunk.mapping
    n = table.num_rows
    numbers = chunk.numbers if chunk.numbers is not None else np.arange(chunk.first_line, chunk.first_line + n)
    rows = Rows(read=n + len(chunk.bad) + chunk.lost, bad=list(chunk.bad), lost=chunk.lost,
                messages=[] if m.chat else None)
    broken = _bad_utf8(table, m.columns)
    if broken:
        for i, name in broken:
            rows.bad.append((int(numbers[i]), f"{chunk.name} row {numbers[i]}: '{name}' is not valid UTF-8; skipped "
                                              "(save the file as UTF-8)", ""))
        keep = np.ones(n, dtype=bool)
        keep[[i for i, _ in broken]] = False
        table, numbers = table.filter(pa.array(keep)), numbers[keep]
        n = table.num_rows
    if m.uid:
        uid_col = table.column(m.uid)
        uids = [chunks.uid_or(u, f"row{k}") for u, k in zip(uid_col.to_pylist(), numbers.tolist())]
    else:
        uids = [f"row{k}" for k in numbers.tolist()]
    if m.chat:
        for i, value in enumerate(table.column(m.chat).to_pylist()):
            chunks.add_conversation(rows, f"{chunk.name} row {numbers[i]}", int(numbers[i]), {m.chat: value},
                                      m.chat, uids[i], uids[i])
        return rows
    texts, missing, why = [], np.zeros(n, dtype=bool), np.full(n, "", dtype=object)
    for key, setting in ((m.title, "data.title_field"), (m.content, "data.content_field")):
        col = table.column(key)
        if not _is_text(col):
            if drop_missing:
                if chunk.first_line == 1:
                    rows.notes.append((0, f"{chunk.name}: column '{key}' holds {col.type} values, not text: its rows "
                                          f"are dropped; set {setting} to a text column"))
                missing[:] = True
                why[why == ""] = f"'{key}' is {col.type}, not text"
                col = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
            else:
                col = pa.array([None if v is None else context_text(v) for v in col.to_pylist()], pa.string())
        col = col.cast(pa.string())
        nulls = col.is_null().to_numpy(zero_copy_only=False)
        empty = pc.equal(pc.binary_length(col.fill_null("")), 0).to_numpy(zero_copy_only=False)
        if drop_missing:
            why[(why == "") & nulls] = f"'{key}' is null"
            why[(why == "") & empty] = f"'{key}' is empty"
            missing |= empty
        texts.append(col.fill_null(""))
    if missing.any():
        rows.empty = int(missing.sum())
        first = np.flatnonzero(missing)[:chunks.N_EMPTY_EXAMPLES].tolist()
        rows.empty_examples = [(int(numbers[i]), uids[i], texts[0][i].as_py(), texts[1][i].as_py(), why[i])
                               for i in first]
        keep = pa.array(~missing)
        texts = [t.filter(keep) for t in texts]
        table, numbers = table.filter(keep), numbers[~missing]
        uids = [u for u, gone in zip(uids, missing.tolist()) if not gone]
    rows.uids, rows.titles, rows.contents = uids, texts[0].to_pylist(), texts[1].to_pylist()
    rows.lines = numbers.tolist()
    for name in m.context:
        col = table.column(name)
        values = col.to_pylist()
        rows.context[name] = ([v or None for v in values] if _is_text(col) else [context_text(v) for v in values])
    rows.arrow = pa.table([pa.array(uids, pa.string()), *texts], names=["uid", "title", "content"])
    rows.checked = True
    return rows
