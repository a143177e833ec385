"""Small helpers shared by the stages: atomic writes, the run folder's layout, excerpts of text."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prodtune.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write leaves the old file (or nothing), never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path, for a folder: build it under a temporary name, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs get the usual mode
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the finished folder goes back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by its name relative to it, sorted; hidden files and folders
    (temporary and scratch ones) left out."""
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, pretty-printed, UTF-8 kept readable."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object a line, atomically; returns the row count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by a previous stage."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found: run the stage that writes it first")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"'{path}' line {i}: not valid JSON ({e.msg}); "
                                    "rerun the stage that wrote it") from None
    return rows


def files_digest(files: Iterable[str | Path]) -> str:
    """A short sha256 of the files' names and contents (a missing file counts as empty)."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        f = Path(f)
        h.update(f.name.encode() + b"\0")
        if f.is_file():
            with open(f, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found: run the stage that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


EXCERPT_CHARS = 240


def excerpt(text: Any, n: int | None = EXCERPT_CHARS, one_line: bool = False) -> str:
    """text (None as '') cut to at most n characters, '…' marking a cut; one_line folds whitespace first."""
    s = "" if text is None else str(text)
    if one_line:
        s = " ".join(s.split())
    return s if n is None or len(s) <= n else s[: max(n - 1, 0)] + "…"


# ----------------------------------------------------------------------------- the run folder

LOCK_NAME = ".prodtune.lock"
_held: set[Path] = set()  # run folders this process holds the lock of


def make_run_dir(root: str | Path) -> Path:
    """Create the run folder (and its parents); a path that cannot be one is a UserError."""
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"output_dir '{root}' is a file, not a folder: set output_dir to a folder "
                        "(or move the file away)") from None
    except NotADirectoryError:
        parent = next((p for p in root.parents if p.is_file()), root.parent)
        raise UserError(f"output_dir '{root}': '{parent}' is a file, so no folder can be made under it; "
                        "set output_dir to another path") from None
    except PermissionError:
        raise UserError(f"output_dir '{root}': permission denied creating it; choose a folder you can "
                        "write to (output_dir=...)") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"output_dir '{root}' is not writable: fix its permissions or choose another "
                        "folder (output_dir=...)")
    return root


@contextmanager
def run_lock(root: str | Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while a command runs in it.

    An OS file lock (flock) on <run>/.prodtune.lock: the kernel drops it when its process ends, so
    the lock of a killed process never blocks the next command. A second command finds it held and
    stops at once, naming the process that holds it. Re-entrant within one process (`prodtune run`
    holds it across its stages). On entry, temporary files that earlier, killed commands left in the
    run folder are swept (nothing else can be writing them while the lock is held).
    """
    import fcntl

    root = make_run_dir(root).resolve()
    if root in _held:  # an outer block of this process holds it
        yield
        return
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"run folder '{root}' is in use by {holder}; wait for it to finish (or stop it), "
                        "or give this command another output_dir") from None
    except OSError as e:  # a file system without locks (some network mounts): run unlocked
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        print(f"prodtune: note: '{root}' cannot be locked ({e.strerror}); do not run two commands in it at once",
              file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"'{command}' (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})".encode(), 0)
    _held.add(root)
    try:
        sweep_temporaries(root)
        yield
    finally:
        _held.discard(root)
        os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the lock


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove what interrupted atomic writes left in the run folder and its stage folders.

    `.<name>.<random>.tmp` files and folders are half-written outputs; `.<name>.old` is a folder an
    atomic swap had moved aside: put back when the swap never finished, else removed.
    """
    swept = []
    for folder in [root, *(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for p in folder.glob(".*.old"):
            final = p.with_name(p.name[1:-len(".old")])
            if not final.exists():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
            swept.append(p)
        for p in folder.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            swept.append(p)
    return swept


COMPARE_SPLITS = ("test", "validation")
"""Splits `prodtune compare` runs on: test (the result) and validation (for choosing eval settings)."""

COMPARE_MODELS = ("adapter", "merged", "gguf")
"""What `prodtune compare` scores against the base: the adapter on the base (the run's result), or a shipped
form from export/: the merged weights, or a GGUF file (`gguf` = the export's first, `gguf-<type>` = that one)."""


class RunPaths:
    """Where each stage reads and writes inside one run folder."""

    def __init__(self, run_dir: str | Path, compare_split: str = "test", compare_model: str = "adapter"):
        self.root = Path(run_dir).expanduser()
        self.compare_split = compare_split
        """Split of the comparison: test -> compare/, validation -> compare-validation/."""
        self.compare_model = compare_model
        """Model compared with the base: adapter -> compare/, merged -> compare-merged/, gguf -> compare-gguf/."""

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    # stage folders
    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def format(self) -> Path:
        return self.root / "format"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def compare(self) -> Path:
        parts = ["compare"] + [p for p in (self.compare_model, self.compare_split) if p not in ("adapter", "test")]
        return self.root / "-".join(parts)

    @property
    def compare_config(self) -> Path:
        """Where a comparison records its config: the test comparison of the adapter is the run's own
        stage (the run's config.yaml, which `ask` and the notebooks read); the others keep theirs in
        their folder."""
        return self.config if self.compare == self.root / "compare" else self.compare / "config.yaml"

    @property
    def export(self) -> Path:
        return self.root / "export"

    # files
    @property
    def clean_parquet(self) -> Path:
        return self.clean / "clean.parquet"

    @property
    def clean_report(self) -> Path:
        return self.clean / "clean_report.json"

    def split(self, name: str) -> Path:
        return self.format / f"{name}.jsonl"

    @property
    def format_report(self) -> Path:
        return self.format / "format_report.json"

    @property
    def adapter(self) -> Path:
        return self.train / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def checkpoints_tag(self) -> Path:
        """What the checkpoints were trained with (config and data), so a resume can be checked."""
        return self.checkpoints / "prodtune.json"

    def format_digest(self) -> str:
        """A digest of the format stage's splits: what an adapter was trained and is compared on."""
        return files_digest(self.split(s) for s in ("train", "validation", "test"))

    @property
    def train_log(self) -> Path:
        return self.train / "log.jsonl"

    @property
    def train_report(self) -> Path:
        return self.train / "train_report.json"

    @property
    def loss_png(self) -> Path:
        return self.train / "loss.png"

    @property
    def merged(self) -> Path:
        return self.export / "merged"

    def gguf(self, run_name: str, gguf_type: str) -> Path:
        """export/<run>-<TYPE>.gguf, the type upper-cased as llama.cpp and the Hub name quantizations."""
        return self.export / f"{run_name}-{gguf_type.upper()}.gguf"

    @property
    def modelfile(self) -> Path:
        return self.export / "Modelfile"

    @property
    def model_card(self) -> Path:
        return self.export / "README.md"

    @property
    def export_report(self) -> Path:
        return self.export / "export_report.json"

    @property
    def answers_csv(self) -> Path:
        return self.compare / "answers.csv"

    @property
    def metrics_json(self) -> Path:
        return self.compare / "metrics.json"

    @property
    def report_md(self) -> Path:
        return self.compare / "report.md"

    @property
    def report_html(self) -> Path:
        return self.compare / "report.html"
