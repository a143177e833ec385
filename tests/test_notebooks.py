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
        limit = 18 if cell in params else 10  # the parameters cell is one setting a line
        assert len(lines) <= limit, f"{name}: a {len(lines)}-line cell belongs in prodtune.notebook"
    first = "".join(code[0]["source"])
    assert "google.colab" in first and "REPO_URL" in first and "USE_DRIVE = False" in first


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
    assert table.loc["rouge_l", "tuned − base"] == "0.200 [0.100, 0.300]"
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
