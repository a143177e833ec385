"""A failed or mistaken command loses nothing: the mistakes users make, each on a copy of a
finished tiny run, must leave the run folder byte for byte as it was and say what to fix in one
line. Also: the run folder's lock, stale splits, killed cleans, and one-line errors at the edges."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prodtune import stages
from prodtune.cli import main
from prodtune.io import LOCK_NAME, RunPaths, read_json

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "trn.json"


def run_args(run: Path, model: Path) -> list[str]:
    """A whole tiny run: the shipped sample, the tiny model, two optimizer steps, short answers."""
    return [f"output_dir={run}", f"data.raw_path={SAMPLE}", f"model.name_or_path={model}",
            "model.dtype=float32", "train.max_steps=2", "train.eval_steps=1", "train.save_steps=1",
            "train.optim=adamw_torch", "train.device=cpu", "train.packing=false", "train.max_eval_samples=4",
            "train.batch_size=2", "train.step_tokens=330", "lora.r=4", "lora.alpha=8",
            "eval.max_samples=4", "eval.max_new_tokens=4", "eval.embedding_model=", "eval.bootstrap_samples=20"]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *run_args(run, tiny_model_dir)]) == 0
    assert len(list(RunPaths(run).checkpoints.glob("checkpoint-*"))) == 2
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run to make mistakes in."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the run folder (the lock file aside) and a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def one_line_error(capsys) -> str:
    """The command's error: one line (progress bars of model loading may come before it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("prodtune ")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


# ----------------------------------------------------------------------------- mistakes

MISTAKES = [
    ("train", ["model.name_or_path=/tmp/nomodel"], "nomodel"),            # a typo in the model
    ("train", ["train.learning_rate=-1"], "train.learning_rate=-1"),
    ("train", ["train.max_length=0"], "train.max_length=0"),
    ("train", ["train.max_steps=-1", "train.epochs=-1"], "train.epochs=-1"),  # would train 0 steps
    ("train", ["train.max_steps=0"], "train.max_steps=0"),
    ("train", ["train.save_steps=0"], "train.save_steps=0"),              # would keep no checkpoint
    ("train", ["lora.target_modules=nope"], "lora.target_modules"),       # found while building the trainer
    ("run", ["model.name_or_path=/tmp/nomodel"], "nomodel"),
    ("compare", ["model.name_or_path=/tmp/typo.gguf"], "typo.gguf"),
    ("compare", ["eval.max_new_tokens=0"], "eval.max_new_tokens=0"),
    ("compare", ["eval.max_samples=0"], "eval.max_samples=0"),
    ("clean", ["data.raw_path=/tmp/typo.json"], "typo.json"),
    ("format", ["data.test_fraction=1.5"], "data.test_fraction"),
]


@pytest.mark.parametrize("command, mistake, named", MISTAKES, ids=[" ".join([c, *m]) for c, m, _ in MISTAKES])
def test_a_mistaken_command_leaves_the_run_as_it_was(run, tiny_model_dir, capsys, command, mistake, named):
    before = snapshot(run)
    capsys.readouterr()
    assert main([command, *run_args(run, tiny_model_dir), *mistake]) == 1
    err = one_line_error(capsys)
    assert named in err and "data.test_fraction" not in err.replace(named, "")
    assert snapshot(run) == before  # checkpoints, adapter, config.yaml, records: all as they were


def test_zero_steps_never_replace_the_adapter(run, tiny_model_dir, monkeypatch):
    """Should a trainer still run no step (the config checks aside), the adapter stays."""
    from prodtune import config
    from prodtune.errors import UserError

    monkeypatch.setattr(config, "validate", lambda cfg: None)
    before = (RunPaths(run).adapter / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="no optimizer step"):
        stages.run_stage(config.load_config(None, run_args(run, tiny_model_dir) + ["train.max_steps=-1", "train.epochs=0"]), "train")
    assert (RunPaths(run).adapter / "adapter_model.safetensors").read_bytes() == before


def test_stale_splits_are_refused(run, tiny_model_dir, capsys):
    """format with another seed, then compare: the adapter trained on other splits is refused."""
    args = run_args(run, tiny_model_dir)
    assert main(["format", *args, "data.seed=7"]) == 0
    capsys.readouterr()
    assert main(["compare", *args, "data.seed=7"]) == 1
    err = one_line_error(capsys)
    trained = read_json(RunPaths(run).train_report)["trained_on"]["format_digest"]
    assert trained in err and RunPaths(run).format_digest() in err
    assert "prodtune train" in err and "prodtune run" in err
    assert main(["train", *args, "data.seed=7", "--resume"]) == 1  # nor are its checkpoints resumed
    assert "other splits" in one_line_error(capsys)


# ----------------------------------------------------------------------------- the lock

def _hold_lock(run: Path) -> subprocess.Popen:
    code = ("import sys, time; from prodtune.io import run_lock\n"
            f"with run_lock({str(run)!r}, 'prodtune run'):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_in_a_busy_run_folder_stops_and_names_the_first(run, capsys):
    holder = _hold_lock(run)
    try:
        before = snapshot(run)
        assert main(["clean", f"output_dir={run}", f"data.raw_path={SAMPLE}"]) == 1
        err = one_line_error(capsys)
        assert "in use by 'prodtune run'" in err and f"pid {holder.pid}" in err
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: no chance to release the lock by itself
        holder.wait()
    assert main(["clean", f"output_dir={run}", f"data.raw_path={SAMPLE}"]) == 0  # a dead holder blocks nothing


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    from prodtune.io import run_lock

    with run_lock(tmp_path, "prodtune run"), run_lock(tmp_path, "prodtune clean"):
        pass
    with run_lock(tmp_path, "prodtune run"):  # released after the outer block
        pass


# ----------------------------------------------------------------------------- edges

def test_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output_dir, words in ((a_file, "is a file"), (a_file / "run", "is a file, so no folder")):
        assert main(["clean", f"output_dir={output_dir}", f"data.raw_path={SAMPLE}"]) == 1
        err = one_line_error(capsys)
        assert str(output_dir) in err and words in err and "output_dir" in err

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # tests may run as root, whom chmod does not stop
    assert main(["clean", f"output_dir={tmp_path / 'locked' / 'run'}", f"data.raw_path={SAMPLE}"]) == 1
    assert "permission denied" in one_line_error(capsys)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import dataclasses

    def broken(cfg, **kwargs):
        raise ValueError("deep inside a library\nsecond line")

    fakes = tuple(dataclasses.replace(s, function=broken) if s.name == "clean" else s for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", fakes)
    args = ["clean", f"output_dir={tmp_path}"]
    assert main(args) == 1
    err = one_line_error(capsys)
    assert "ValueError: deep inside a library" in err and "--debug" in err
    with pytest.raises(ValueError):
        main([*args, "--debug"])


def test_os_errors_name_the_path(tmp_path, capsys, monkeypatch):
    import dataclasses

    def full(cfg, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "clean" / "clean.parquet"))

    fakes = tuple(dataclasses.replace(s, function=full) if s.name == "clean" else s for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", fakes)
    assert main(["clean", f"output_dir={tmp_path}"]) == 1
    err = one_line_error(capsys)
    assert "No space left on device" in err and "clean.parquet" in err


@pytest.mark.parametrize("name, content, words", [
    ("utf16.json", '{"uid": "1", "title": "t", "content": "a description"}\n'.encode("utf-16"), "UTF-16"),
    ("random.json", bytes(range(256)) * 40, "not text"),
    ("export.csv", b"sku,name,price\n1,Mog's Kittens,3.99\n", "its columns: sku, name, price"),
])
def test_files_of_another_kind_are_named_not_cleaned_to_nothing(tmp_path, capsys, name, content, words):
    raw = tmp_path / name
    raw.write_bytes(content)
    assert main(["clean", f"output_dir={tmp_path / 'run'}", f"data.raw_path={raw}"]) == 1
    err = one_line_error(capsys)
    assert words in err and name in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_outputs_have_the_usual_modes(finished):
    umask = os.umask(0)
    os.umask(umask)
    paths = RunPaths(finished)
    for folder in (paths.clean, paths.adapter, paths.compare):  # built under a temporary name
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
    for f in (*paths.clean.iterdir(), *paths.compare.iterdir()):  # the files prodtune writes itself
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# ----------------------------------------------------------------------------- a killed clean

def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            kids.append(int(status.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_a_killed_multi_worker_clean_leaves_no_workers_and_no_temporaries(tmp_path):
    """SIGKILL a clean while its two workers are busy: the workers die with it, its temporary
    folders are all inside the run folder, and the next command sweeps them."""
    run = tmp_path / "run"
    # Workers that take their time on each chunk, so the kill lands mid-run (the pool forks them,
    # so they inherit the slowed function).
    code = ("import time, prodtune.clean as c\n"
            "c.POOL_MIN_BYTES = 0\nreal = c.clean_chunk\n"
            "def slow(chunk, data):\n    time.sleep(2)\n    return real(chunk, data)\n"
            "c.clean_chunk = slow\nfrom prodtune.cli import main\n"
            f"main(['clean', 'output_dir={run}', 'data.raw_path={SAMPLE}', 'data.chunk_rows=20', "
            "'data.clean_workers=2'])")
    spills_before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("prodtune-clean-*"))
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(workers := _children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(workers) >= 2, "the clean never started its workers"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived the killed clean"
    left = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert left, "the killed clean should have been mid-write"
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("prodtune-clean-*")) == spills_before
    assert main(["clean", f"output_dir={run}", f"data.raw_path={SAMPLE}"]) == 0
    assert not [p for p in run.rglob("*.tmp")]  # swept by the next command
