"""Helpers the three notebooks call, so their cells stay one line per step.

    ENV = setup(use_drive=False)                           # Colab or local: folders, error display
    cfg = config_from_file("configs/demo.yaml", {"data.min_content_chars": 20, ...})   # tratar-dados
    cfg = config_from_run(OUTPUT_DIR, {"lora.r": 16, ...}, needs="format")           # the next two
    report = run_stage(cfg, "train")                       # each step, recorded as the CLI records it

The notebooks hand off through the run folder exactly as the CLI stages do: the first builds its
config from a config file, the later ones from the run folder's config.yaml (written by every
stage), each with the notebook's inline parameters on top. What a notebook needs from the one
before is checked up front, with a message naming the notebook to run first.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prodtune.config import Config, load_config, to_dict
from prodtune.errors import UserError
from prodtune.io import RunPaths, excerpt
# The notebooks run each stage with run_stage, as the CLI does, so that it is recorded as done.
from prodtune.stages import get_stage, run_stage  # noqa: F401

COLAB_REPO = Path("/content/prodtune")  # where the notebooks' first cell clones the repository in Colab
DRIVE_MOUNT = Path("/content/drive")

# ----------------------------------------------------------------------------- environment

@dataclass
class Env:
    """Where the notebook runs and where its data and run folders live."""

    colab: bool
    """Running in Google Colab."""
    drive: bool
    """Data and run folders are on the mounted Google Drive."""
    root: Path
    """The repository (the working directory: configs/ and data/sample/ are relative to it)."""
    data_dir: Path
    """Raw data folder: data/ locally, <Drive>/prodtune/data with USE_DRIVE."""
    runs_dir: Path
    """Parent of the run folders: outputs/ locally, <Drive>/prodtune/outputs with USE_DRIVE."""


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def _repo_root() -> Path:
    """The checkout the notebooks belong to: the working directory, else the package's source tree."""
    cwd = Path.cwd()
    if (cwd / "configs").is_dir():
        return cwd
    if in_colab() and COLAB_REPO.is_dir():
        return COLAB_REPO
    src_tree = Path(__file__).resolve().parents[2]  # src/prodtune/notebook.py -> the checkout
    return src_tree if (src_tree / "configs").is_dir() else cwd


def setup(use_drive: bool = False, drive_folder: str = "prodtune") -> Env:
    """Prepare a notebook: cd to the repository, mount Google Drive when asked (Colab only),
    and show prodtune's UserErrors as one line instead of a traceback."""
    root = _repo_root()
    os.chdir(root)
    colab = in_colab()
    data_dir, runs_dir = Path("data"), Path("outputs")
    if use_drive and not colab:
        print("USE_DRIVE is only for Colab; using the local data/ and outputs/ folders")
    elif use_drive:
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(str(DRIVE_MOUNT))
        base = DRIVE_MOUNT / "MyDrive" / drive_folder
        data_dir, runs_dir = base / "data", base / "outputs"
        if not (data_dir / "sample").exists():  # the demo should run from Drive too
            shutil.copytree(root / "data" / "sample", data_dir / "sample")
        runs_dir.mkdir(parents=True, exist_ok=True)
    _show_user_errors_briefly()
    where = "Google Colab" if colab else "local"
    print(f"prodtune notebook ({where}): working in {root}; data in {data_dir}, runs in {runs_dir}")
    return Env(colab=colab, drive=use_drive and colab, root=root, data_dir=data_dir, runs_dir=runs_dir)


def hub_login() -> None:
    """Make a Hugging Face token available to `push`: one already set or saved, else Colab's secret
    named HF_TOKEN, else huggingface_hub's login box (paste a token with write access)."""
    import huggingface_hub

    if huggingface_hub.get_token():
        return
    if in_colab():
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            token = userdata.get("HF_TOKEN")
        except Exception:  # no such secret, or the notebook was not granted access to it
            token = None
        if token:
            os.environ["HF_TOKEN"] = token
            return
    huggingface_hub.notebook_login()


def _show_user_errors_briefly() -> None:
    """A UserError stops the cell (and 'Run all') but prints one line, as the CLI does."""
    try:
        ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        return

    def handler(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
        message = f"UserError: {value}"
        print(message, file=sys.stderr)
        return [message]

    ip.set_custom_exc((UserError,), handler)


# ----------------------------------------------------------------------------- config

def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 1}} -> {'train.epochs': 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _with_params(path: Path, params: dict[str, Any]) -> Config:
    """The config file with {dotted.key: value} on top; says what the parameters changed."""
    before = _flat(to_dict(load_config(path)))
    cfg = load_config(path, values=params)
    after = _flat(to_dict(cfg))
    changed = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in params if before.get(k) != after.get(k)]
    print(f"config: {path}" + (" with the parameters above" if params else ""))
    if changed:
        print("  changed by this notebook: " + "; ".join(changed))
    print(f"  run folder: {cfg.run_dir}")
    return cfg


def config_from_file(path: str | Path, params: dict[str, Any] | None = None) -> Config:
    """The first notebook's config: a YAML config file with the notebook's parameters on top.

    `params` maps dotted keys to values, e.g. {"output_dir": OUTPUT_DIR, "lora.r": 16}.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' not found (working in {Path.cwd()}); "
                        "set CONFIG to a file in configs/, e.g. configs/demo.yaml")
    return _with_params(p, dict(params or {}))


def config_from_run(output_dir: str | Path, params: dict[str, Any] | None = None,
                    needs: Literal["clean", "format", "train"] = "clean") -> Config:
    """A later notebook's config: the run folder's config.yaml (saved by the notebook before)
    with this notebook's parameters on top; checks that the previous stage's outputs exist."""
    run = RunPaths(output_dir)
    if not run.config.is_file():
        first = get_stage("clean")
        raise UserError(f"no run in '{run.root}' (config.yaml missing): run {first.notebook} first with "
                        f"OUTPUT_DIR = '{run.root}' (or '{first.command} --config ...'), or fix OUTPUT_DIR")
    require(run.root, needs)
    return _with_params(run.config, {"output_dir": str(output_dir), **(params or {})})


def require(run_dir: str | Path, stage: Literal["clean", "format", "train"]) -> None:
    """Raise a UserError naming the notebook to run first when a stage's outputs are missing."""
    run = RunPaths(run_dir)
    step = get_stage(stage)
    missing = [str(p) for p in step.outputs(run) if not p.exists()]
    if missing:
        raise UserError(f"the {stage} stage's outputs are missing in '{run.root}' ({', '.join(missing)}): "
                        f"run {step.notebook} first (or '{step.command}'), with the same OUTPUT_DIR")


# ----------------------------------------------------------------------------- display

def _display(obj: Any) -> None:
    try:
        from IPython.display import display

        display(obj)
    except ImportError:
        print(obj)


def _markdown(text: str) -> None:
    try:
        from IPython.display import Markdown

        _display(Markdown(text))
    except ImportError:
        print(text)


def show_clean(report: dict[str, Any], run_dir: str | Path, examples: int = 2) -> None:
    """The clean report as tables: rows read/dropped per rule/kept, rows changed per rule, examples
    of each rule (dropped rows; before → after for edits), and the first clean rows."""
    import pandas as pd

    read = report.get("rows_read") or 0
    dropped = report.get("dropped", {})
    counts = [("rows read", read), *((f"dropped: {r}", n) for r, n in dropped.items()),
              ("rows kept", report.get("rows_kept"))]
    table = pd.DataFrame(counts, columns=["", "rows"]).set_index("")
    table["% of read"] = (100 * table["rows"] / max(read, 1)).round(1)
    _markdown("**Rows read, dropped per rule, kept** (`clean/clean_report.json`)")
    _display(table)
    changed = pd.DataFrame(list(report.get("changed", {}).items()), columns=["rule", "rows changed"])
    if len(changed):
        _markdown("**Rows changed per rule** (kept, with their text cleaned)")
        _display(changed.set_index("rule"))
    ex = report.get("examples", {})
    for title, rules in (("Examples of dropped rows", dropped), ("Examples of changes (before → after)",
                                                                 report.get("changed", {}))):
        rows = [{"rule": rule, **{k: excerpt(v, 160) for k, v in item.items() if k != "uid"}}
                for rule in rules for item in ex.get(rule, [])[:examples]]
        if rows:
            _markdown(f"**{title}** (up to {examples} per rule)")
            _display(pd.DataFrame(rows).fillna("").set_index("rule"))
    parquet = RunPaths(run_dir).clean_parquet
    if parquet.is_file():
        _markdown(f"**The first clean rows** (`{parquet}`)")
        head = pd.read_parquet(parquet).head(5)
        _display(head.assign(content=head["content"].map(lambda t: excerpt(t, 200))))


def show_format(report: dict[str, Any], run_dir: str | Path, n: int = 3, cfg: Config | None = None) -> None:
    """Split sizes, length statistics, a few formatted examples and one as the model sees it."""
    import pandas as pd

    _markdown("**Splits** (no normalised title is in two splits)")
    _display(pd.DataFrame(report.get("splits", {})).T)
    lengths = report.get("lengths", {})
    stats = {f"{unit}: {part}": s for unit in ("chars", "tokens") if lengths.get(unit)
             for part, s in lengths[unit].items() if isinstance(s, dict)}
    if stats:
        _markdown("**Lengths** (characters; tokens with the model's tokenizer)")
        _display(pd.DataFrame(stats).T)
    rows = _read_jsonl_head(RunPaths(run_dir).split("train"), n)
    system = report.get("system_prompt") or "(none)"
    _markdown(f"**{len(rows)} formatted training examples** (`format/train.jsonl`; system prompt: *{system}*)")
    _display(pd.DataFrame([{
        "question (user)": r["prompt"][-1]["content"],
        "answer (assistant)": excerpt(r["completion"][0]["content"], 300)} for r in rows]))
    if rows and cfg is not None:
        _show_chat_text(rows[0], cfg)


def _read_jsonl_head(path: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= n:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _show_chat_text(row: dict[str, Any], cfg: Config) -> None:
    """One example through the model's chat template: the exact text training sees."""
    try:
        from prodtune.models import load_tokenizer

        tok = load_tokenizer(cfg.model)
        text = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    except Exception as e:  # a preview only: a model that is not available offline is fine here
        print(f"(chat template preview skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return
    _markdown(f"**The first example as the model sees it** ({cfg.model.name_or_path} chat template)")
    print(text)


def show_train(report: dict[str, Any], run_dir: str | Path) -> None:
    """Training figures (steps, losses, speed, memory) and the loss curve (train/loss.png)."""
    import pandas as pd

    flat = {k: v for k, v in report.items() if not isinstance(v, (dict, list)) and k != "summary"}
    _markdown("**Training** (`train/train_report.json`)")
    _display(pd.Series(flat, name="value", dtype=object).to_frame())
    show_image(RunPaths(run_dir).loss_png, "Loss curve: training and validation loss by step")


def show_image(path: str | Path, caption: str = "") -> None:
    """Show a PNG if it exists (or say it is missing)."""
    path = Path(path)
    if not path.is_file():
        print(f"({path} not found)")
        return
    from IPython.display import Image

    if caption:
        _markdown(f"**{caption}** (`{path}`)")
    _display(Image(filename=str(path)))


def metrics_table(metrics: dict[str, Any]) -> Any:
    """metrics.json as a table: per metric, base / tuned / tuned − base (mean [95% interval]) and
    whether the tuned model is better, worse or the same beyond noise."""
    import pandas as pd

    from prodtune.metrics import fmt_interval, verdict

    rows = [{"metric": k, "base": fmt_interval(metrics["base"][k]), "tuned": fmt_interval(metrics["tuned"][k]),
             "tuned − base": fmt_interval(metrics["diff"][k], signed=True),
             "tuned is": verdict(k, metrics["diff"][k])}
            for k in metrics["base"] if k in metrics["tuned"] and k in metrics["diff"]]
    return pd.DataFrame(rows).set_index("metric")


def show_compare(run_dir: str | Path) -> None:
    """The metric table and chart of compare/metrics.json, and where the full report is."""
    import base64

    from IPython.display import Image

    from prodtune.plots import metrics_figure, png_base64

    paths = RunPaths(run_dir)
    if not paths.metrics_json.is_file():
        raise UserError(f"'{paths.metrics_json}' not found: run the comparison step above first")
    metrics = json.loads(paths.metrics_json.read_text(encoding="utf-8"))
    _markdown(f"**Metrics on {metrics.get('n', '?')} held-out test items** (mean [95% bootstrap interval]; "
              "*better* or *worse* when the interval of tuned − base excludes zero)")
    _display(metrics_table(metrics))
    _markdown("**Base and tuned, mean and 95% interval per metric** (the chart of `compare/report.html`)")
    _display(Image(data=base64.b64decode(png_base64(metrics_figure(metrics)))))
    if paths.report_html.is_file():
        print(f"full report (opens offline in a browser): {paths.report_html}")


def side_by_side(run_dir: str | Path, n: int = 10, width: int = 300) -> Any:
    """Base and tuned answers next to the reference for the first n test items (compare/answers.csv)."""
    import pandas as pd

    path = RunPaths(run_dir).answers_csv
    if not path.is_file():
        raise UserError(f"'{path}' not found: run the comparison step above first")
    df = pd.read_csv(path, keep_default_na=False)
    text = [c for c in ("title", "reference", "base_answer", "tuned_answer") if c in df.columns]
    scores = [c for c in ("base_rouge_l", "tuned_rouge_l") if c in df.columns]
    view = df[text + scores].head(n).copy()
    for c in text:
        view[c] = view[c].map(lambda t: excerpt(t, width))
    styler = view.style.set_properties(**{"text-align": "left", "white-space": "pre-wrap",
                                          "vertical-align": "top"})
    return styler.format(precision=3, subset=scores) if scores else styler


def ask_both(question: str, run_dir: str | Path, max_new_tokens: int | None = None,
             context: dict[str, str] | None = None) -> Any:
    """One question to the base and the tuned model of a run (with the product's context fields,
    e.g. {"brand": "Acme"}, when it was trained with some), answers side by side."""
    import pandas as pd

    from prodtune import generate

    require(run_dir, "train")
    answers = generate.ask_both(question, run_dir, max_new_tokens=max_new_tokens, context=context)
    return pd.DataFrame([answers], index=[question]).style.set_properties(
        **{"text-align": "left", "white-space": "pre-wrap", "vertical-align": "top"})
