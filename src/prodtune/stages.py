"""The pipeline's stages, listed once, and `run_stage`, the one way to run one.

    from prodtune.stages import run_stage
    report = run_stage(cfg, "clean")            # prodtune clean, prodtune run and the notebooks
    report = run_stage(cfg, "train", resume=True)

Each `Stage` names its function (a plain reference), the folder it writes, the run-folder files it
reads and writes, what its outputs depend on in the config, and its help. The CLI builds its
subcommands from STAGES, `prodtune run` walks it in order, and the notebooks check a run folder
against it.

`run_stage` records in `<stage folder>/.stage.json` a hash of the config the stage depends on
(chained with the hashes of the stages before it) and when it started and finished, so that a later
`prodtune run` skips a stage already done with the same config, wherever it was run from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prodtune import distributed
from prodtune.clean import clean_stage
from prodtune.config import Config, save_config, section_hash
from prodtune.errors import UserError
from prodtune.evaluate import compare_stage
from prodtune.export import export_stage
from prodtune.io import RunPaths, atomic_path, read_json, run_lock, write_json
from prodtune.prompts import SPLITS, format_stage
from prodtune.train import train_stage, trained_with

# Data fields that only the format stage reads; every other data field counts for clean too
# (a field added later is then redone too often, never skipped wrongly).
FORMAT_FIELDS = {"sample_size", "val_fraction", "test_fraction", "seed", "system_prompt",
                 "question_templates", "count_tokens", "token_stats_rows"}


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline."""

    name: str
    function: Callable[..., dict[str, Any]]
    """Called as function(cfg, **kwargs); returns the stage's report (with a printable "summary")."""
    help: str
    notebook: str
    """The notebook (and step) that runs this stage."""
    folder: Callable[..., Path]
    """folder(paths, **kwargs): where the stage writes, and its .stage.json record (a comparison of
    another split or model writes elsewhere: its own folder, its own record and config)."""
    inputs: Callable[[RunPaths], list[Path]]
    """Run-folder files the stage reads (written by the stages before it)."""
    outputs: Callable[[RunPaths], list[Path]]
    """The files that make the stage finished."""
    depends_on: Callable[[Config], Any]
    """The config values (and input fingerprints) its outputs depend on."""
    wanted: Callable[[Config], bool] = lambda cfg: True
    """Whether `prodtune run` runs it with this config (export only when export.formats asks)."""

    @property
    def command(self) -> str:
        return f"prodtune {self.name}"


def _fields(section: Any, keep: Callable[[str], bool]) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if keep(f.name)}


def _input_fingerprint(raw_path: str) -> Any:
    """Size and mtime of the raw file, so replacing it redoes cleaning (hub ids: the id itself)."""
    p = Path(raw_path).expanduser()
    return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else raw_path


def _clean_depends(cfg: Config) -> Any:
    return [_fields(cfg.data, lambda n: n not in FORMAT_FIELDS), _input_fingerprint(cfg.data.raw_path)]


def _format_depends(cfg: Config) -> Any:
    # Not the model or train.max_length: the report's token counts use them, but the splits do not,
    # and the report names the tokenizer and length it counted with. A model chosen after
    # formatting (the third notebook's parameters) must not redo the splits.
    return _fields(cfg.data, lambda n: n in FORMAT_FIELDS)


def _splits(p: RunPaths) -> list[Path]:
    return [p.split(s) for s in SPLITS]


STAGES: tuple[Stage, ...] = (
    Stage("clean", clean_stage,
          "Stage 1: clean the raw input into clean/clean.parquet and clean_report.json.",
          "tratar-dados.ipynb", lambda p, **_: p.clean,
          inputs=lambda p: [],
          outputs=lambda p: [p.clean_parquet, p.clean_report], depends_on=_clean_depends),
    Stage("format", format_stage,
          "Stage 2: turn clean rows into prompt-completion JSONL splits under format/.",
          "transforma-em-json.ipynb", lambda p, **_: p.format,
          inputs=lambda p: [p.clean_parquet],
          outputs=lambda p: [*_splits(p), p.format_report], depends_on=_format_depends),
    Stage("train", train_stage,
          "Stage 3: LoRA/QLoRA fine-tuning with TRL's SFTTrainer; writes train/adapter.",
          "treino-e-teste.ipynb (its training step)", lambda p, **_: p.train,
          inputs=lambda p: [p.split("train"), p.split("validation")],
          outputs=lambda p: [p.adapter / "adapter_config.json", p.train_report],
          depends_on=trained_with),
    Stage("compare", compare_stage,
          "Stage 4: base vs tuned answers on the held-out test split, metrics and a report.",
          "treino-e-teste.ipynb (its comparison step)",
          lambda p, split="test", which="adapter", **_: RunPaths(p.root, split, which).compare,
          inputs=lambda p: [p.split("test"), p.adapter / "adapter_config.json"],
          outputs=lambda p: [p.answers_csv, p.metrics_json, p.report_md, p.report_html],
          depends_on=lambda c: [c.eval]),
    # After compare: the model card quotes its numbers, so a new comparison redoes the export.
    Stage("export", export_stage,
          "Ship the tuned model into export/: merged safetensors, GGUF, Ollama Modelfile, model card "
          "(export.formats).",
          "treino-e-teste.ipynb (its export step)", lambda p, **_: p.export,
          inputs=lambda p: [p.adapter / "adapter_config.json", p.metrics_json],
          outputs=lambda p: [p.export_report], depends_on=lambda c: [c.export],
          wanted=lambda c: bool(c.export.formats)),
)


def get_stage(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UserError(f"no stage named {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Each stage's config hash, chained: a change upstream changes every hash downstream."""
    hashes: dict[str, str] = {}
    upstream = ""
    for stage in STAGES:
        upstream = hashes[stage.name] = section_hash(stage.depends_on(cfg), upstream)
    return hashes


def record_path(stage: Stage, paths: RunPaths, **kwargs: Any) -> Path:
    return stage.folder(paths, **kwargs) / ".stage.json"


def read_record(stage: Stage, paths: RunPaths) -> dict[str, Any] | None:
    """The stage's .stage.json, or None when missing or unreadable (never finished)."""
    try:
        record = read_json(record_path(stage, paths))
    except Exception:
        return None
    return record if isinstance(record, dict) else None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_stage(cfg: Config, name: str, **kwargs: Any) -> dict[str, Any]:
    """Run stage `name` with this config, holding the run folder's lock, and record it.

    On success the stage's .stage.json records it finished with this config, and the run's
    config.yaml becomes this config (a run into another folder, such as compare --split
    validation, keeps its settings there instead). A stage that fails leaves the record as it was;
    one that is interrupted (Ctrl-C, or killed) leaves a record that started but never finished,
    from which `prodtune run` continues an interrupted training.
    """
    stage = get_stage(name)
    paths = RunPaths(cfg.run_dir)
    if not distributed.is_main_process():  # rank 0 writes; the others train alongside it
        return stage.function(cfg, **kwargs)
    with run_lock(paths.root, f"prodtune {name}"):
        record = record_path(stage, paths, **kwargs)
        if record.parent.exists() and not record.parent.is_dir():
            raise UserError(f"'{record.parent}' is a file, not a folder: the {name} stage writes its outputs "
                            "there; move the file away")
        before = record.read_bytes() if record.is_file() else None
        made_folder = not record.parent.exists()
        digest = stage_hashes(cfg)[name]
        started, clock = _now(), time.time()
        write_json(record, {"stage": name, "hash": digest, "started": started, "finished": None})
        try:
            report = stage.function(cfg, **kwargs)
        except Exception:
            _restore(record, before)
            if made_folder and not any(record.parent.iterdir()):
                record.parent.rmdir()
            raise
        write_json(record, {"stage": name, "hash": digest, "started": started, "finished": _now(),
                            "seconds": round(time.time() - clock, 1)})
        if stage.folder(paths, **kwargs) == stage.folder(paths):
            save_config(cfg, paths.config)
    return report


def _restore(record: Path, before: bytes | None) -> None:
    """Put a stage record back as it was before a failed run."""
    if before is None:
        record.unlink(missing_ok=True)
    else:
        with atomic_path(record) as tmp:
            tmp.write_bytes(before)
