"""Data-parallel training on the CPU: two torchrun processes (gloo) train the tiny Phi-3
and must end where one process ends at the same global batch; only rank 0 writes; --resume works.

Why the two runs can agree to float noise: the config is the same (batch 2 x accumulation 2),
and the two processes split it (2 x 2 x 1, prodtune.distributed.split_batch). The Trainer's
random sampler becomes accelerate's seeded sampler, the same permutation on every rank, and
accelerate deals its micro-batches to the ranks in turn, so step k trains on the same 4 examples
either way. The loss is divided by the token count of the whole step gathered over the ranks,
and DDP averages the gradients, so the update is the single process's up to the order of the
sums in the all-reduce (0 to 1e-7 here). atol 1e-5 on LoRA weights of ~0.1 still catches a
wrong split: the same run with half the examples per step ends 1e-2 away.

(`accelerate launch --cpu --num_processes 2` starts one process only; torchrun is what
`accelerate launch --multi_gpu` runs underneath, so it is used here directly.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_args, write_format

from prodtune.cli import main
from prodtune.distributed import split_batch
from prodtune.io import RunPaths

SAME_BATCH = ["train.batch_size=2", "train.step_tokens=660", "lora.dropout=0"]  # 4 examples of ~165 tokens


def torchrun(run_dir: Path, model_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`prodtune train` in two CPU processes joined by gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prodtune", "train", *extra, *tiny_args(run_dir, model_dir, *SAME_BATCH)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(RunPaths(run_dir).adapter / "adapter_model.safetensors")


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in RunPaths(run_dir).train_log.read_text().splitlines()]


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), (k, (wa[k] - wb[k]).abs().max())


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The same config trained by one process (in-process CLI) and by two (torchrun)."""
    single, double = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("double")
    for run in (single, double):
        write_format(run)
    assert main(["train", *tiny_args(single, tiny_model_dir, *SAME_BATCH)]) == 0
    return single, double, torchrun(double, tiny_model_dir)


@pytest.mark.slow  # the fixture's two launches take ~35 s on 2 cores
def test_two_processes_match_one_at_the_same_global_batch(runs):
    single, double, proc = runs
    assert_same_adapter(single, double)
    report = json.loads(RunPaths(double).train_report.read_text())
    assert (report["processes"], report["per_device_batch"], report["grad_accum"]) == (2, 2, 1)
    assert report["global_batch"] == 4 and report["global_batch_kept"]
    assert report["steps"] == 4 and len(report["peak_memory_gib_per_process"]) == 2
    # Tokens are counted over both processes: the same as one process saw.
    assert report["tokens_seen"] == json.loads(RunPaths(single).train_report.read_text())["tokens_seen"]
    # The same losses, logged once per step (rank 0 alone writes log.jsonl).
    a, b = log_rows(single), log_rows(double)
    assert [(r["step"], r["loss"] is None) for r in a] == [(r["step"], r["loss"] is None) for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "eval_loss", "tokens_seen"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x, y)
    # One summary and one start line, from rank 0.
    assert proc.stdout.count("trained 4 steps") == 1 and "on 2 x cpu" in proc.stdout
    assert proc.stdout.count("prodtune: training") == 1
    assert "4.0 examples of ~" in proc.stdout and "(2 examples x 1 accumulation x 2 processes)" in proc.stdout


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_files(runs):
    single, double, _ = runs

    def files(run: Path) -> set[str]:
        return {str(p.relative_to(run)) for p in (run / "train").rglob("*")
                if "tensorboard" not in p.parts and "rng_state" not in p.name}

    # The same files as a single-process run (the Trainer keeps one RNG state per process).
    assert files(double) == files(single)
    assert len(list((RunPaths(double).train / "tensorboard").glob("events.out.tfevents.*"))) == 1
    ckpt = RunPaths(double).checkpoints / "checkpoint-4"
    assert sorted(p.name for p in ckpt.glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert RunPaths(double).config.is_file() and RunPaths(double).loss_png.stat().st_size > 1000


@pytest.mark.slow  # ~20 s
def test_resume_under_two_processes(runs, tiny_model_dir, tmp_path):
    """Killed after step 3 (checkpoint-2 is the last one): both ranks resume from it and end where
    the uninterrupted run ended."""
    _, double, _ = runs
    broken = tmp_path / "broken"
    shutil.copytree(double, broken)
    paths = RunPaths(broken)
    shutil.rmtree(paths.checkpoints / "checkpoint-4")
    shutil.rmtree(paths.adapter)
    paths.train_report.unlink()
    torchrun(broken, tiny_model_dir, "--resume")
    assert_same_adapter(double, broken)
    report = json.loads(paths.train_report.read_text())
    assert report["resumed_from"].endswith("checkpoint-2") and report["steps"] == 4
    steps = [r["step"] for r in log_rows(broken) if r["loss"] is not None]
    assert steps == [1, 2, 3, 4]  # the log's rows past the checkpoint were dropped, not doubled


@pytest.mark.parametrize("per_device, accum, processes, expected", [
    (2, 4, 1, (2, 4, True)),
    (2, 4, 2, (2, 2, True)),    # the accumulation is divided first
    (2, 4, 8, (1, 1, True)),    # then the micro-batch
    (8, 1, 4, (2, 1, True)),    # fast path: 8 rows of 2048 tokens -> 2 rows on each of 4 GPUs
    (4, 2, 2, (4, 1, True)),    # small path: 4 rows x 2 -> 4 rows x 1 on each of 2 GPUs
    (8, 1, 3, (3, 1, False)),   # not divisible: 9 rows a step instead of 8, said so
])
def test_split_batch_keeps_the_global_batch(per_device, accum, processes, expected):
    split = split_batch(per_device, accum, processes)
    assert (split.per_device, split.accum, split.kept) == expected
    if split.kept:
        assert split.global_batch == per_device * accum
    else:
        assert "not divisible" in split.describe()


SYNC_FREE_WORKER = """
import json, sys
from pathlib import Path
import torch
from prodtune import distributed, fast
from test_fast import MAX_LEN, make_trainer

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
speed = fast.SpeedPlan("fast", "cpu test", rows=1, max_length=MAX_LEN, checkpoint_every=0, attn_implementation="sdpa")
rows = {}
for name, cls in (("trl", None), ("ours", fast.trainer_class(speed))):
    torch.manual_seed(0)
    trainer = make_trainer(model_dir, out / name, speed, n_rows=24, cls=cls, max_steps=2, logging_steps=1,
                           include_num_input_tokens_seen="non_padding", learning_rate=1e-3)
    trainer.train()
    rows[name] = [r for r in trainer.state.log_history if "loss" in r]
if distributed.is_main_process():
    print("RESULT " + json.dumps({**rows, "processes": distributed.world_size()}))
"""


@pytest.mark.slow  # two processes, two tiny trainings each: ~40 s on 2 cores
def test_sync_free_trainer_under_two_processes(tiny_model_dir, tmp_path):
    """The speed paths' trainer gathers its token counts and metrics over the processes as TRL's
    own trainer does: the same tokens seen, token counts, losses and metrics at every log."""
    script = tmp_path / "worker.py"
    script.write_text(SYNC_FREE_WORKER)
    tests = str(Path(__file__).parent)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_model_dir), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert rows["processes"] == 2 and len(rows["ours"]) == len(rows["trl"]) == 2
    for ours, trl in zip(rows["ours"], rows["trl"]):
        assert ours["num_input_tokens_seen"] == trl["num_input_tokens_seen"] > 0
        assert ours["num_tokens"] == trl["num_tokens"]
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert ours[key] == pytest.approx(trl[key], rel=1e-5, abs=1e-7), key
