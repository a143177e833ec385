"""train.report_to: TensorBoard, MLflow (a local file store) and W&B (offline) get the training curves
that train/log.jsonl records; every integration runs here without a network."""

from __future__ import annotations

import glob
import struct
from pathlib import Path

import pytest

from prodtune import train as train_mod
from prodtune.cli import main
from prodtune.config import ModelConfig, load_config
from prodtune.errors import UserError
from prodtune.io import RunPaths, read_jsonl
from test_train import tiny_args, write_format


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(RunPaths(run_dir).train_log) if r["loss"] is not None}


def train(run_dir: Path, model_dir: Path, report_to: str) -> None:
    write_format(run_dir)
    assert main(["train", *tiny_args(run_dir, model_dir, f"train.report_to={report_to}", "train.max_steps=2")]) == 0


@pytest.mark.parametrize("value, tensorboard, others", [
    ("tensorboard", True, []), ("none", False, []), ([], False, []), ("wandb", False, ["wandb"]),
    (["tensorboard", "MLflow"], True, ["mlflow"]), ("wandb,mlflow", False, ["wandb", "mlflow"]),
])
def test_report_to_is_split_between_our_tensorboard_and_trl(tmp_path, value, tensorboard, others):
    train_cfg = load_config(None, [f"train.report_to={value}" if isinstance(value, str) else "train.device=cpu"]).train
    if not isinstance(value, str):
        train_cfg.report_to = value
    train_cfg.device = "cpu"
    assert train_mod.report_targets(train_cfg.report_to) == (tensorboard, others)
    plan = train_mod.make_plan(train_cfg, ModelConfig(), example_tokens=200.0)
    args = train_mod.sft_config(train_cfg, plan, tmp_path / "myrun" / "train" / "checkpoints", has_eval=False)
    assert list(args.report_to) == others and args.run_name == "myrun"


def test_an_unknown_or_missing_integration_is_one_clear_error(monkeypatch):
    with pytest.raises(UserError, match="'tensorbord' is not one of none, tensorboard, wandb, mlflow"):
        train_mod.report_targets("tensorbord")
    with pytest.raises(UserError, match="'none' cannot be combined"):
        train_mod.report_targets(["none", "wandb"])
    real = train_mod.importlib.util.find_spec
    monkeypatch.setattr(train_mod.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match="the wandb package is not installed; pip install wandb"):
        train_mod.report_targets(["tensorboard", "wandb"])


def test_mlflow_file_store_gets_the_losses(tiny_model_dir, tmp_path, monkeypatch):
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told
    run_dir = tmp_path / "shop-run"
    train(run_dir, tiny_model_dir, "mlflow")
    client = mlflow.tracking.MlflowClient(store.as_uri())
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "shop-run"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == losses(run_dir)
    assert not (RunPaths(run_dir).train / "tensorboard").exists()


def _wandb_records(path: str) -> list:
    """The records of an offline W&B run file. wandb 0.31 reads these files in its Go core only, so
    the file's framing (LevelDB's log format: 32 KiB blocks, 7-byte record headers) is undone here;
    the records are wandb's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, parts, records = Path(path).read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def test_wandb_offline_run_gets_the_losses_and_tensorboard_too(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "shop-run"
    train(run_dir, tiny_model_dir, "wandb,tensorboard")
    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = _wandb_records(path)
    assert [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"][0] == "shop-run"
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if "train/loss" in items:
                logged[int(items["train/global_step"])] = float(items["train/loss"])
    assert logged == losses(run_dir)
    assert list((RunPaths(run_dir).train / "tensorboard").glob("events.out.tfevents.*"))
