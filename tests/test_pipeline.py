"""`prodtune run`: finished stages are skipped, a changed config redoes its stage and the ones
after it, --force redoes everything, an interrupted training resumes. Stages are fakes here."""

from __future__ import annotations

import json

import pytest

import dataclasses

from prodtune import pipeline, stages
from prodtune.config import Config
from prodtune.io import RunPaths


class FakeStages:
    """Stand-ins for the four stage functions: record each call and write the stage's outputs."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, bool]] = []
        self.fail_in: str | None = None
        fakes = tuple(dataclasses.replace(s, function=self._function(s)) for s in stages.STAGES)
        monkeypatch.setattr(stages, "STAGES", fakes)

    def _function(self, stage):
        def fake(cfg, resume=False):
            self.calls.append((stage.name, resume))
            paths = RunPaths(cfg.run_dir)
            if stage.name == self.fail_in:
                if stage.name == "train":  # got as far as a checkpoint
                    (paths.checkpoints / "checkpoint-2").mkdir(parents=True)
                    (paths.checkpoints / "checkpoint-2" / "trainer_state.json").write_text("{}")
                raise KeyboardInterrupt
            for out in stage.outputs(paths):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("x")
            if stage.name == "compare":
                paths.metrics_json.write_text(json.dumps(_metrics()))
            return {"summary": f"{stage.name} done"}
        return fake

    def names(self) -> list[str]:
        names = [name for name, _ in self.calls]
        self.calls.clear()
        return names


def _metrics():
    entry = {"mean": 0.5, "ci95": [0.4, 0.6]}
    return {"base": {"rouge_l": entry, "chrf": entry}, "tuned": {"rouge_l": entry, "chrf": entry},
            "diff": {"rouge_l": entry, "chrf": entry}, "n": 3}


@pytest.fixture
def cfg(tmp_path):
    raw = tmp_path / "trn.json"
    raw.write_text('{"uid": "1", "title": "t", "content": "c"}\n')
    c = Config(run_name="p", output_dir=str(tmp_path / "run"))
    c.data.raw_path = str(raw)
    return c


@pytest.fixture
def fakes(monkeypatch):
    return FakeStages(monkeypatch)


ALL = ["clean", "format", "train", "compare"]


def test_second_run_skips_everything(cfg, fakes, capsys):
    first = pipeline.run_pipeline(cfg)
    assert fakes.names() == ALL and set(first["stages"].values()) == {"ran"}
    second = pipeline.run_pipeline(cfg)
    assert fakes.names() == []
    assert set(second["stages"].values()) == {"skipped"}
    assert "ROUGE-L" in second["summary"]  # the headline numbers even when nothing ran
    marker = json.loads((RunPaths(cfg.run_dir).train / ".stage.json").read_text())
    assert marker["finished"] and marker["hash"] == stages.stage_hashes(cfg)["train"]
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("section, key, value, redone", [
    ("data", "strip_html", False, ALL),
    ("data", "test_fraction", 0.2, ALL[1:]),
    ("lora", "r", 8, ALL[2:]),
    ("train", "learning_rate", 1e-3, ALL[2:]),
    ("train", "report_to", "none", []),  # where logs go changes no output
    ("model", "load_in_4bit", True, ALL[2:]),
    ("eval", "max_new_tokens", 32, ["compare"]),
])
def test_changed_config_redoes_its_stage_and_downstream(cfg, fakes, section, key, value, redone):
    cfg.data.count_tokens = False
    pipeline.run_pipeline(cfg)
    fakes.names()
    setattr(getattr(cfg, section), key, value)
    pipeline.run_pipeline(cfg)
    assert fakes.names() == redone
    pipeline.run_pipeline(cfg)
    assert fakes.names() == []


def test_replaced_raw_file_redoes_cleaning(cfg, fakes):
    pipeline.run_pipeline(cfg)
    fakes.names()
    with open(cfg.data.raw_path, "a") as f:
        f.write('{"uid": "2", "title": "u", "content": "d"}\n')
    pipeline.run_pipeline(cfg)
    assert fakes.names() == ALL


def test_missing_output_redoes_that_stage_and_downstream(cfg, fakes):
    pipeline.run_pipeline(cfg)
    fakes.names()
    RunPaths(cfg.run_dir).split("test").unlink()
    pipeline.run_pipeline(cfg)
    assert fakes.names() == ["format", "train", "compare"]


def test_force_redoes_everything(cfg, fakes):
    pipeline.run_pipeline(cfg)
    fakes.names()
    result = pipeline.run_pipeline(cfg, force=True)
    assert fakes.names() == ALL and set(result["stages"].values()) == {"ran"}


def test_interrupted_training_resumes(cfg, fakes, capsys):
    fakes.fail_in = "train"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg)
    assert fakes.names() == ["clean", "format", "train"]
    fakes.fail_in = None
    capsys.readouterr()
    result = pipeline.run_pipeline(cfg)
    assert "train    resuming (interrupted" in capsys.readouterr().out
    assert fakes.calls == [("train", True), ("compare", False)]
    assert result["stages"] == {"clean": "skipped", "format": "skipped", "train": "resumed", "compare": "ran"}


def test_interrupted_training_with_changed_config_starts_over(cfg, fakes):
    fakes.fail_in = "train"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg)
    fakes.names()
    fakes.fail_in = None
    cfg.train.learning_rate = 1e-3
    pipeline.run_pipeline(cfg)
    assert fakes.calls == [("train", False), ("compare", False)]


def test_a_stage_that_fails_keeps_its_previous_record(cfg, fakes, monkeypatch):
    """A failure (not an interruption) puts the stage's record back: nothing to resume, and a
    `prodtune run` with the old config still finds the old result finished."""
    pipeline.run_pipeline(cfg)
    marker = RunPaths(cfg.run_dir).train / ".stage.json"
    before = marker.read_bytes()

    def fail(cfg, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(stages, "STAGES", tuple(dataclasses.replace(s, function=fail) for s in stages.STAGES))
    cfg.train.learning_rate = 1e-3
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(cfg)
    assert marker.read_bytes() == before


def test_interrupted_compare_reruns_only_compare(cfg, fakes):
    fakes.fail_in = "compare"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg)
    fakes.names()
    fakes.fail_in = None
    pipeline.run_pipeline(cfg)
    assert fakes.names() == ["compare"]


def test_hashes_are_chained():
    a, b = Config(), Config()
    b.data.seed = 1  # a format setting
    ha, hb = stages.stage_hashes(a), stages.stage_hashes(b)
    assert ha["clean"] == hb["clean"]
    assert all(ha[s] != hb[s] for s in ("format", "train", "compare"))


def test_every_stage_is_listed_once_and_reachable_from_the_cli():
    from prodtune.cli import build_parser

    names = [s.name for s in stages.STAGES]
    assert names == [*ALL, "export"] and len(set(names)) == len(names)
    commands = build_parser()._subparsers._group_actions[0].choices
    for stage in stages.STAGES:
        assert callable(stage.function) and stage.name in commands
        assert commands[stage.name].description == stage.help


def test_a_stage_marked_finished_on_its_own_is_skipped(cfg, fakes):
    pipeline.run_pipeline(cfg)
    fakes.names()
    cfg.eval.max_new_tokens = 32  # as if `prodtune compare` (or a notebook) ran alone with a new setting
    stages.run_stage(cfg, "compare")
    assert fakes.names() == ["compare"]
    pipeline.run_pipeline(cfg)
    assert fakes.names() == []


def test_real_stages_on_the_tiny_model(tiny_model_dir, sample_raw, tmp_path, capsys):
    """clean -> format -> train (1 step) -> compare for real, then a rerun that skips all four."""
    from prodtune.config import load_config

    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.raw_path={sample_raw}", f"model.name_or_path={tiny_model_dir}",
        "model.dtype=float32", "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1",
        "train.optim=adamw_torch", "train.device=cpu", "train.packing=false", "train.max_eval_samples=4",
        "eval.max_samples=6", "eval.max_new_tokens=6", "eval.embedding_model=", "eval.bootstrap_samples=50"])
    first = pipeline.run_pipeline(cfg)
    assert first["stages"] == dict.fromkeys(ALL, "ran")
    assert json.loads(RunPaths(cfg.run_dir).metrics_json.read_text())["n"] == 6
    second = pipeline.run_pipeline(cfg)
    assert second["stages"] == dict.fromkeys(ALL, "skipped")
    assert "ROUGE-L" in second["summary"]


def test_export_runs_last_when_asked_and_is_skipped_when_done(cfg, fakes):
    cfg.data.count_tokens = False
    cfg.export.formats = ["merged", "card"]
    first = pipeline.run_pipeline(cfg)
    assert fakes.names() == ALL + ["export"] and first["stages"]["export"] == "ran"
    assert "export done" in first["summary"]
    assert pipeline.run_pipeline(cfg)["stages"]["export"] == "skipped" and fakes.names() == []
    cfg.eval.max_new_tokens = 32  # the card quotes compare's numbers: a new comparison, a new export
    pipeline.run_pipeline(cfg)
    assert fakes.names() == ["compare", "export"]
    cfg.export.formats = ["merged"]
    pipeline.run_pipeline(cfg)
    assert fakes.names() == ["export"]


def test_export_is_not_run_unless_asked(cfg, fakes, capsys):
    result = pipeline.run_pipeline(cfg)
    assert fakes.names() == ALL and "export" not in result["stages"]
    assert "export   not asked (export.formats is empty)" in capsys.readouterr().out
