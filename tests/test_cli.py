"""The CLI, driven in-process through prodtune.cli.main([...])."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prodtune.cli import COMMANDS, main
from prodtune.stages import STAGES
from prodtune.io import RunPaths, read_json, read_jsonl
from prodtune.prompts import SPLITS

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def one_line_error(capsys) -> str:
    """stderr of a failed command: exactly one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in [*(s.name for s in STAGES), *COMMANDS, "ask", "config"]:
        assert command in out


@pytest.mark.parametrize("command", [*(s.name for s in STAGES), *COMMANDS, "ask", "config"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: prodtune " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: prodtune" in capsys.readouterr().out


def test_clean_then_format_on_the_shipped_sample(tmp_path, sample_raw, tiny_model_dir, capsys):
    args = ["--config", DEMO, f"output_dir={tmp_path}", f"data.raw_path={sample_raw}",
            f"model.name_or_path={tiny_model_dir}"]
    assert main(["clean", *args]) == 0
    paths = RunPaths(tmp_path)
    assert paths.clean_parquet.is_file() and paths.clean_report.is_file()

    assert main(["format", *args]) == 0
    out = capsys.readouterr().out
    for split in SPLITS:
        rows = read_jsonl(paths.split(split))
        assert rows, split
        assert str(paths.split(split)) in out
    report = read_json(paths.format_report)
    assert report["lengths"]["tokens"] is not None
    assert sum(s["rows"] for s in report["splits"].values()) == report["rows"] == 275  # blurbs dropped
    saved = yaml.safe_load(paths.config.read_text())
    assert saved["output_dir"] == str(tmp_path) and saved["data"]["raw_path"] == str(sample_raw)


def test_config_fields_lists_keys(capsys):
    assert main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    for key in ("data.raw_path", "data.sample_size", "model.name_or_path", "lora.r",
                "train.learning_rate", "eval.max_new_tokens", "output_dir"):
        assert key in out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", DEMO, "train.learning_rate=1e-4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["learning_rate"] == 1e-4
    assert resolved["run_name"] == "demo"


@pytest.mark.parametrize("argv, words", [
    (["clean", "--config", "no/such/config.yaml"], ["no/such/config.yaml", "not found"]),
    (["format", "--config", DEMO, "data.sampel_size=3", "trian.epochs=1"], ["data.sampel_size", "trian"]),
    (["config", "train.batch_size=many"], ["train.batch_size", "many"]),
    (["clean", "data.raw_path=no/such/trn.json"], ["no/such/trn.json"]),
])
def test_user_errors_are_one_line_and_exit_1(argv, words, capsys, tmp_path):
    if argv[0] != "config":
        argv = [*argv, f"output_dir={tmp_path}"]
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"prodtune {argv[0]}: error: ")
    for word in words:
        assert word in err


def test_format_before_clean_says_run_clean(tmp_path, capsys):
    assert main(["format", f"output_dir={tmp_path}"]) == 1
    assert "prodtune clean" in one_line_error(capsys)


def test_stage_run_alone_is_recorded_for_prodtune_run(tmp_path, sample_raw, capsys):
    """`prodtune clean` on its own marks the stage finished, so `prodtune run` would skip it."""
    from prodtune.config import load_config
    from prodtune.pipeline import plan_stage
    from prodtune.stages import get_stage, stage_hashes

    overrides = [f"output_dir={tmp_path}", f"data.raw_path={sample_raw}"]
    assert main(["clean", *overrides]) == 0
    cfg = load_config(None, overrides)
    action, _ = plan_stage(get_stage("clean"), RunPaths(tmp_path), stage_hashes(cfg)["clean"], False, False)
    assert action == "skip"


def test_only_train_runs_under_several_processes(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["clean", f"output_dir={tmp_path}"]) == 1
    assert "launch only 'prodtune train'" in capsys.readouterr().err
