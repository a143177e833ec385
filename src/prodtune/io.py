"""Small file helpers shared by the stages: atomic writes and the run folder's layout."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
        # mkstemp makes 0600 files; give outputs the usual permissions (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path, for a folder: build it under a temporary name, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found: run the stage that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


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
