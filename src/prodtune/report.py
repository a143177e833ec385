"""What people read of a comparison: compare/report.md, compare/report.html and the printed headline.

The HTML page is one self-contained file that opens offline: inline CSS, a few lines of inline JS
(search and sort of the item table), charts as inline base64 PNGs. Product text and model output
contain markup (descriptions come from web pages), so every piece of data is HTML-escaped; the
only <script> element in the page is our own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from prodtune.io import RunPaths, atomic_write_text, excerpt
from prodtune.metrics import LOWER_IS_BETTER, METRICS, fmt, fmt_interval, verdict

# per-item columns shown in the HTML item table: (table suffix, header)
ITEM_SCORES = [("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("bleu", "BLEU"),
               ("embedding_cosine", "cosine"), ("length_words", "words"), ("stop_rate", "ended")]
EXAMPLES_IN_MD = 3


def load_train_log(path: Path) -> list[dict[str, Any]]:
    """train/log.jsonl rows (step, loss and/or eval_loss); [] when absent or unreadable."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- charts

def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def metrics_chart(metrics: dict[str, Any]) -> str:
    """Base64 PNG: one small panel per metric, base and tuned with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["base"])
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for x, (key, color) in enumerate((("base", "#8c8c8c"), ("tuned", "#2f6fb0"))):
            entry = metrics[key][name]
            lo, hi = entry["ci95"]
            mean = entry["mean"]
            err = [[max(mean - lo, 0)], [max(hi - mean, 0)]] if math.isfinite(lo) else None
            ax.bar(x, mean, color=color, width=0.6)
            if err is not None:
                ax.errorbar(x, mean, yerr=err, color="black", capsize=4, lw=1)
        ax.set_xticks([0, 1], ["base", "tuned"])
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def loss_chart(log: list[dict[str, Any]]) -> str | None:
    """Base64 PNG of the training and validation loss by step (the train stage's figure); None without a log."""
    import tempfile

    from prodtune.plots import loss_series, plot_loss

    if not any(steps for steps, _ in loss_series(log).values()):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_loss(log, Path(tmp) / "loss.png", title="Training and validation loss")
        return base64.b64encode(png.read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- markdown

def _md(text: Any, limit: int | None = None) -> str:
    """Text safe inside a markdown table or paragraph: markup escaped, one line, | escaped."""
    return html.escape(excerpt(text, limit, one_line=True), quote=False).replace("|", "\\|")


def render_markdown(metrics: dict[str, Any], table: Any, info: dict[str, Any]) -> str:
    """report.md: settings, the metric table with intervals, and the first few items."""
    lines = [f"# Base vs tuned: {_md(info.get('run', ''))}", "",
             f"{metrics['n']} held-out {_md(info.get('split', 'test'))} items (titles never seen in training). "
             f"Model `{_md(info.get('model', ''))}`, decoding: {_md(info.get('decoding', ''))}. Intervals: 95% bootstrap "
             f"({info.get('bootstrap_samples', '?')} resamples); the difference is paired (same items).", "",
             "| metric | base | tuned | tuned − base | |", "|---|---|---|---|---|"]
    for name in metrics["base"]:
        diff = metrics["diff"][name]
        mark = {"better": "✅ better", "worse": "❌ worse", "same": ""}[verdict(name, diff)]
        lines.append(f"| {name} | {fmt_interval(metrics['base'][name])} | {fmt_interval(metrics['tuned'][name])} "
                     f"| {fmt_interval(diff, signed=True)} | {mark} |")
    lines += ["", "Metrics: " + "; ".join(f"**{k}**: {v}" for k, v in METRICS.items() if k in metrics["base"]) + ".",
              "", f"## Examples (the first {min(EXAMPLES_IN_MD, len(table))} items)", ""]
    for _, row in table.head(EXAMPLES_IN_MD).iterrows():
        lines += [f"### {_md(row['title'], 200)}", "", f"- **Question:** {_md(row['question'], 400)}",
                  f"- **Reference:** {_md(row['reference'], 600)}",
                  f"- **Base:** {_md(row['base_answer'], 600)}",
                  f"- **Tuned:** {_md(row['tuned_answer'], 600)}", ""]
    lines.append("Every item, side by side and searchable: report.html; as a table: answers.csv.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em} .muted{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.88em} th,td{border:1px solid #ddd;padding:4px 7px;vertical-align:top}
th{background:#f3f3f3;text-align:left} #items th{cursor:pointer;position:sticky;top:0;user-select:none}
#items th:after{content:" \\2195";color:#aaa} td.num{text-align:right;white-space:nowrap}
td.txt{max-width:330px;white-space:pre-wrap;word-wrap:break-word}
.better{background:#e3f4e1} .worse{background:#fbe3e1} img{max-width:100%}
#search{padding:6px 9px;width:360px;font-size:1em;margin:8px 0}
"""

JS = """
const table=document.getElementById('items'), body=table.tBodies[0];
document.getElementById('search').addEventListener('input', e => {
  const q=e.target.value.toLowerCase(); let shown=0;
  for (const tr of body.rows) { const ok=tr.textContent.toLowerCase().includes(q);
    tr.style.display=ok?'':'none'; shown+=ok; }
  document.getElementById('count').textContent=shown;
});
table.tHead.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
  const key = tr => { const c=tr.cells[col], v=c.dataset.v ?? c.textContent, n=parseFloat(v);
    return isNaN(n) ? v.toLowerCase() : n; };
  const rows=[...body.rows].sort((a,b)=>{const x=key(a),y=key(b); return (x<y?-1:x>y?1:0)*(asc?1:-1);});
  rows.forEach(r=>body.appendChild(r));
}));
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num_cell(value: Any, yes_no: bool = False) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return f'<td class="num">{_e(value)}</td>'
    shown = ("yes" if x else "no") if yes_no and math.isfinite(x) else fmt(x)
    return f'<td class="num" data-v="{x if math.isfinite(x) else ""}">{shown}</td>'


def render_html(metrics: dict[str, Any], table: Any, info: dict[str, Any],
                train_log: list[dict[str, Any]]) -> str:
    """report.html: metric table, metric chart, loss curves and every item side by side."""
    metric_rows = []
    for name in metrics["base"]:
        diff = metrics["diff"][name]
        metric_rows.append(
            f'<tr><td><b>{_e(name)}</b></td><td class="num">{_e(fmt_interval(metrics["base"][name]))}</td>'
            f'<td class="num">{_e(fmt_interval(metrics["tuned"][name]))}</td>'
            f'<td class="num {verdict(name, diff)}">{_e(fmt_interval(diff, signed=True))}</td>'
            f'<td class="muted">{_e(METRICS.get(name, ""))}</td></tr>')
    loss_png = loss_chart(train_log)
    loss_html = (f'<img alt="training loss" src="data:image/png;base64,{loss_png}">' if loss_png
                 else '<p class="muted">No training log (train/log.jsonl) found.</p>')

    scores = [(k, h) for k, h in ITEM_SCORES if f"base_{k}" in table.columns]
    head = ["#", "title", "question", "reference", "base answer", "tuned answer"]
    head += [f"{h} {m}" for k, h in scores for m in ("base", "tuned")]
    item_rows = []
    for i, row in enumerate(table.itertuples(index=False), 1):
        r = row._asdict()
        cells = [f'<td class="num" data-v="{i}">{i}</td>']
        cells += [f'<td class="txt">{_e(r[c])}</td>'
                  for c in ("title", "question", "reference", "base_answer", "tuned_answer")]
        cells += [_num_cell(r[f"{m}_{k}"], yes_no=k == "stop_rate") for k, _ in scores for m in ("base", "tuned")]
        item_rows.append("<tr>" + "".join(cells) + "</tr>")

    settings = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>prodtune: base vs tuned ({_e(info.get("run", ""))})</title>
<style>{CSS}</style></head><body>
<h1>Base vs tuned: {_e(info.get("run", ""))}</h1>
<p>{metrics["n"]} held-out {_e(info.get("split", "test"))} items, whose titles never appear in training;
decoding: {_e(info.get("decoding", ""))}. Intervals are 95%
bootstrap intervals; the difference tuned − base is paired (the same resampled items for both),
green where the interval shows the tuned model better, red where worse.</p>
<h2>Metrics</h2>
<table><thead><tr><th>metric</th><th>base [95% CI]</th><th>tuned [95% CI]</th>
<th>tuned − base [95% CI]</th><th>meaning</th></tr></thead><tbody>
{"".join(metric_rows)}
</tbody></table>
<p><img alt="metrics with 95% intervals" src="data:image/png;base64,{metrics_chart(metrics)}"></p>
<h2>Training loss</h2>
{loss_html}
<h2>Every test item</h2>
<input id="search" type="search" placeholder="Search titles, references and answers…">
<span class="muted"><span id="count">{len(item_rows)}</span> items shown; click a column to sort.</span>
<table id="items"><thead><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}</tr></thead><tbody>
{"".join(item_rows)}
</tbody></table>
<h2>Settings</h2>
<table>{settings}</table>
<script>{JS}</script>
</body></html>
"""


def write_reports(paths: RunPaths, metrics: dict[str, Any], table: Any, info: dict[str, Any]) -> None:
    """Write compare/report.md and compare/report.html (each atomically)."""
    log = load_train_log(paths.train_log)
    atomic_write_text(paths.report_md, render_markdown(metrics, table, info))
    atomic_write_text(paths.report_html, render_html(metrics, table, info, log))


# ----------------------------------------------------------------------------- headline

# (metric, label) in the headline, when metrics.json has them
HEADLINE = [("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("embedding_cosine", "cosine"), ("loss", "loss"),
            ("stop_rate", "stop rate")]
SAYS = {"better": "tuned better", "worse": "tuned worse", "same": "no clear difference"}


def headline(metrics: dict[str, Any], paths: RunPaths) -> str:
    """The lines `prodtune compare` and `prodtune run` print: where the report is, the main metrics, verdicts."""
    items = "held-out" if paths.compare_split == "test" else paths.compare_split
    lines = [f"compare: {metrics['n']} {items} items; report: {paths.report_html}",
             f"  answers: {paths.answers_csv}   metrics: {paths.metrics_json}",
             f"  {'':<9} {'base':>6} -> {'tuned':<6}   tuned - base [95% CI]"]
    for name, label in HEADLINE:
        if name not in metrics["base"]:
            continue
        b, t, d = metrics["base"][name], metrics["tuned"][name], metrics["diff"][name]
        says = SAYS[verdict(name, d)] + (" (lower is better)" if name in LOWER_IS_BETTER else "")
        lines.append(f"  {label:<9} {fmt(b['mean']):>6} -> {fmt(t['mean']):<6}   "
                     f"{fmt_interval(d, signed=True):<26} {says}")
    return "\n".join(lines)
