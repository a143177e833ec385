"""`prodtune run`: clean -> format -> train -> compare [-> export], skipping stages already done.

After a stage returns, `<stage folder>/.stage.json` records a hash of the config it depends on
(chained with the hashes of the stages before it) and when it finished. On the next run a stage
is skipped when that record matches the current config and its outputs exist; otherwise it runs,
and so does every stage after it. A training run that was interrupted (a record that started
but never finished, with the same config, and a complete checkpoint) continues from the
checkpoint with train_stage(cfg, resume=True).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prodtune.config import Config, save_config, section_hash
from prodtune.io import RunPaths, read_json, write_json

# Data fields that only the format stage reads; every other data field counts for clean too
# (a field added later is then redone too often, never skipped wrongly).
FORMAT_FIELDS = {"sample_size", "val_fraction", "test_fraction", "seed", "system_prompt",
                 "question_templates", "count_tokens", "token_stats_rows"}


@dataclass(frozen=True)
class Stage:
    """One pipeline step: the function to call, its folder, and what finished looks like."""

    name: str
    module: str
    function: str
    folder: Callable[[RunPaths], Path]
    outputs: Callable[[RunPaths], list[Path]]
    depends_on: Callable[[Config], Any]
    """The config values (and input fingerprints) the stage's outputs depend on."""
    wanted: Callable[[Config], bool] = lambda cfg: True
    """Whether `prodtune run` runs this stage at all with this config (export only when export.formats asks)."""


def _fields(section: Any, keep: Callable[[str], bool]) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if keep(f.name)}


def _input_fingerprint(raw_path: str) -> Any:
    """Size and mtime of the raw file, so replacing it redoes cleaning (hub ids: the id itself)."""
    p = Path(raw_path).expanduser()
    return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else raw_path


def _clean_depends(cfg: Config) -> Any:
    return [_fields(cfg.data, lambda n: n not in FORMAT_FIELDS), _input_fingerprint(cfg.data.raw_path)]


def _format_depends(cfg: Config) -> Any:
    # With count_tokens the report counts tokens with the model's tokenizer against train.max_length.
    tokens = [cfg.model.name_or_path, cfg.train.max_length] if cfg.data.count_tokens else None
    return [_fields(cfg.data, lambda n: n in FORMAT_FIELDS), tokens]


STAGES = [
    Stage("clean", "prodtune.clean", "clean_stage", lambda p: p.clean,
          lambda p: [p.clean_parquet, p.clean_report], _clean_depends),
    Stage("format", "prodtune.prompts", "format_stage", lambda p: p.format,
          lambda p: [p.split("train"), p.split("validation"), p.split("test"), p.format_report],
          _format_depends),
    Stage("train", "prodtune.train", "train_stage", lambda p: p.train,
          lambda p: [p.adapter / "adapter_config.json", p.train_report], lambda c: [c.model, c.lora, c.train]),
    Stage("compare", "prodtune.evaluate", "compare_stage", lambda p: p.compare,
          lambda p: [p.answers_csv, p.metrics_json, p.report_md, p.report_html], lambda c: [c.eval]),
    # The model card quotes compare's numbers, so a new comparison redoes the export.
    Stage("export", "prodtune.export", "export_stage", lambda p: p.export, lambda p: [p.export_report],
          lambda c: [c.export], wanted=lambda c: bool(c.export.formats)),
]


def stage_function(stage: Stage) -> Callable[..., dict[str, Any]]:
    """The stage's function, imported when needed (tests replace this to run fakes)."""
    return getattr(importlib.import_module(stage.module), stage.function)


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Each stage's config hash, chained: a change upstream changes every hash downstream."""
    hashes: dict[str, str] = {}
    upstream = ""
    for stage in STAGES:
        upstream = hashes[stage.name] = section_hash(stage.depends_on(cfg), upstream)
    return hashes


def _marker(stage: Stage, paths: RunPaths) -> Path:
    return stage.folder(paths) / ".stage.json"


def _record(stage: Stage, paths: RunPaths) -> dict[str, Any] | None:
    try:
        record = read_json(_marker(stage, paths))
    except Exception:  # missing or unreadable: treated as never finished
        return None
    return record if isinstance(record, dict) else None


def _has_checkpoint(paths: RunPaths) -> bool:
    return any(paths.checkpoints.glob("checkpoint-*/trainer_state.json"))


def plan_stage(stage: Stage, paths: RunPaths, digest: str, upstream_ran: bool, force: bool) -> tuple[str, str]:
    """('skip' | 'run' | 'resume', why) for one stage."""
    record = _record(stage, paths)
    same = record is not None and record.get("hash") == digest
    if force:
        return "run", "--force"
    if upstream_ran:
        return "run", "an earlier stage ran"
    if same and record.get("finished"):
        missing = [p for p in stage.outputs(paths) if not p.exists()]
        if not missing:
            return "skip", f"finished {record['finished']}, config unchanged"
        return "run", f"output missing: {missing[0]}"
    if same and stage.name == "train" and _has_checkpoint(paths):
        return "resume", "interrupted; continuing from the last checkpoint"
    if record is None:
        return "run", "not run yet"
    return "run", "config changed" if not same else "did not finish"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def mark_finished(cfg: Config, name: str, seconds: float | None = None) -> None:
    """Record that stage `name` finished with this config (for a stage run on its own, e.g. from the CLI)."""
    stage = next(s for s in STAGES if s.name == name)
    paths = RunPaths(cfg.run_dir)
    record = _record(stage, paths) or {}
    digest = stage_hashes(cfg)[name]
    started = record.get("started") if record.get("hash") == digest else None
    write_json(_marker(stage, paths), {"stage": name, "hash": digest, "started": started or _now(),
                                       "finished": _now(), "seconds": seconds})


def run_pipeline(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Clean, format, train and compare in order; a finished stage with unchanged config is skipped."""
    paths = RunPaths(cfg.run_dir)
    save_config(cfg, paths.config)
    hashes = stage_hashes(cfg)
    status: dict[str, str] = {}
    reports: dict[str, Any] = {}
    upstream_ran = False
    for stage in STAGES:
        if not stage.wanted(cfg):
            print(f"run: {stage.name:<8} not asked (export.formats is empty)", flush=True)
            continue
        action, why = plan_stage(stage, paths, hashes[stage.name], upstream_ran, force)
        print(f"run: {stage.name:<8} {'skipped' if action == 'skip' else action + 'ning'} ({why})", flush=True)
        status[stage.name] = {"skip": "skipped", "run": "ran", "resume": "resumed"}[action]
        if action == "skip":
            continue
        upstream_ran = True
        started = time.time()
        # An interrupted stage leaves this unfinished record; for train it allows resuming.
        write_json(_marker(stage, paths), {"stage": stage.name, "hash": hashes[stage.name],
                                           "started": _now(), "finished": None})
        fn = stage_function(stage)
        report = fn(cfg, resume=True) if action == "resume" else fn(cfg)
        reports[stage.name] = report
        mark_finished(cfg, stage.name, round(time.time() - started, 1))
        if stage.name not in ("compare", "export") and isinstance(report, dict) and report.get("summary"):
            print(report["summary"], flush=True)  # compare's headline and export's files close the run's summary
    lines = ["run: " + ", ".join(f"{name} {s}" for name, s in status.items()) + f"  ({paths.root})"]
    if status["compare"] == "skipped" and paths.metrics_json.is_file():
        from prodtune.evaluate import headline

        lines.append(headline(read_json(paths.metrics_json), paths))  # the numbers, even when nothing ran
    elif isinstance(reports.get("compare"), dict) and reports["compare"].get("summary"):
        lines.append(reports["compare"]["summary"])
    if isinstance(reports.get("export"), dict) and reports["export"].get("summary"):
        lines.append(reports["export"]["summary"])
    elif status.get("export") == "skipped":
        lines.append(f"export: {paths.export} (unchanged)")
    return {"stages": status, "hashes": hashes, "reports": reports, "run_dir": str(paths.root),
            "summary": "\n".join(lines)}
