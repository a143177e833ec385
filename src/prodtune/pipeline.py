"""`prodtune run`: every stage of prodtune.stages in order, skipping the ones already done.

A stage is skipped when its .stage.json (written by `run_stage`, whoever ran it: this command,
the stage's own command or a notebook) records the current config's hash as finished and its
outputs exist; otherwise it runs, and so does every stage after it. A training run that was
interrupted (a record that started but never finished, with the same config, and a complete
checkpoint) continues from the checkpoint.
"""

from __future__ import annotations

from typing import Any

from prodtune import stages
from prodtune.config import Config, save_config
from prodtune.io import RunPaths, read_json, run_lock
from prodtune.report import headline
from prodtune.train import last_checkpoint

DOING = {"skip": "skipped", "run": "running", "resume": "resuming"}
DONE = {"skip": "skipped", "run": "ran", "resume": "resumed"}


def plan_stage(stage: stages.Stage, paths: RunPaths, digest: str, upstream_ran: bool,
               force: bool) -> tuple[str, str]:
    """('skip' | 'run' | 'resume', why) for one stage."""
    record = stages.read_record(stage, paths)
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
    if same and stage.name == "train" and last_checkpoint(paths) is not None:
        return "resume", "interrupted; continuing from the last checkpoint"
    if record is None:
        return "run", "not run yet"
    return "run", "config changed" if not same else "did not finish"


def run_pipeline(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Every stage in order; a finished stage with unchanged config is skipped."""
    paths = RunPaths(cfg.run_dir)
    with run_lock(paths.root, "prodtune run"):
        return _run_stages(cfg, paths, force)


def _run_stages(cfg: Config, paths: RunPaths, force: bool) -> dict[str, Any]:
    hashes = stages.stage_hashes(cfg)
    status: dict[str, str] = {}
    reports: dict[str, Any] = {}
    upstream_ran = False
    for stage in stages.STAGES:
        if not stage.wanted(cfg):
            print(f"run: {stage.name:<8} not asked (export.formats is empty)", flush=True)
            continue
        action, why = plan_stage(stage, paths, hashes[stage.name], upstream_ran, force)
        print(f"run: {stage.name:<8} {DOING[action]} ({why})", flush=True)
        status[stage.name] = DONE[action]
        if action == "skip":
            continue
        upstream_ran = True
        report = stages.run_stage(cfg, stage.name, **({"resume": True} if action == "resume" else {}))
        reports[stage.name] = report
        if stage.name not in ("compare", "export") and isinstance(report, dict) and report.get("summary"):
            print(report["summary"], flush=True)  # compare's headline and export's files close the run's summary
    save_config(cfg, paths.config)  # also when every stage was skipped
    lines = ["run: " + ", ".join(f"{name} {s}" for name, s in status.items()) + f"  ({paths.root})"]
    if status["compare"] == "skipped" and paths.metrics_json.is_file():
        lines.append(headline(read_json(paths.metrics_json), paths))  # the numbers, even when nothing ran
    elif isinstance(reports.get("compare"), dict) and reports["compare"].get("summary"):
        lines.append(reports["compare"]["summary"])
    if isinstance(reports.get("export"), dict) and reports["export"].get("summary"):
        lines.append(reports["export"]["summary"])
    elif status.get("export") == "skipped":
        lines.append(f"export: {paths.export} (unchanged)")
    return {"stages": status, "hashes": hashes, "reports": reports, "run_dir": str(paths.root),
            "summary": "\n".join(lines)}
