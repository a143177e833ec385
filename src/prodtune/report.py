"""What people read of a comparison: compare/report.md, compare/report.html and the printed headline.

The HTML page is one self-contained file that opens offline: inline CSS, a few lines of inline JS
(search, and sort by any score), charts as inline base64 PNGs. Each test item reads as one: the
question and the reference, the two answers side by side (stacked on a phone), its scores on one
line. Product text and model output contain markup (descriptions come from web pages), so every
piece of data is HTML-escaped; the only <script> element in the page is our own.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from prodtune.io import RunPaths, atomic_write_text, excerpt
from prodtune.metrics import LOWER_IS_BETTER, METRICS, fmt, fmt_interval, verdict
from prodtune.plots import loss_figure, loss_series, metrics_figure, png_base64

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
        said = verdict(name, diff)
        mark = {"better": "✅ better", "worse": "❌ worse", "same": ""}.get(said, said)
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
:root{--line:#e2e2e2;--base:#8c8c8c;--tuned:#2f6fb0;--good:#1a7f37;--bad:#b42318}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;padding:24px;color:#222;
     max-width:1240px;line-height:1.45}
h1{font-size:1.5em;margin-top:0} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid var(--line);
     padding-bottom:4px} .muted{color:#666;font-size:.9em} .scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.88em} th,td{border:1px solid #ddd;padding:4px 7px;vertical-align:top}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;white-space:nowrap;vertical-align:middle}
td.metric{min-width:200px;max-width:340px} td.metric .muted{font-size:.85em}
td.better{background:#e3f4e1} td.worse{background:#fbe3e1} img{max-width:100%;height:auto} .chart{margin:1em 0}
.controls{position:sticky;top:0;z-index:1;background:#fff;display:flex;flex-wrap:wrap;align-items:center;
          gap:8px 14px;padding:10px 0;border-bottom:1px solid var(--line)}
.controls label{white-space:nowrap} #search{flex:1 1 260px;max-width:440px;padding:6px 9px;font-size:1em}
select{font-size:.95em;padding:4px;max-width:100%}
.item{border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:14px 0}
.item h3{font-size:1.05em;margin:0 0 8px} .item h3 .n{color:#888;font-weight:normal;margin-right:.4em}
.label{display:block;font-size:.72em;font-weight:600;letter-spacing:.06em;text-transform:uppercase;color:#666}
.text{white-space:pre-wrap;overflow-wrap:anywhere}
.q{margin:0 0 8px} .ref{background:#f7f6f1;border-left:3px solid #c8c0a0;padding:6px 10px;margin:0 0 10px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.answer{background:#fafafa;border-left:3px solid var(--base);padding:6px 10px}
.answer.tuned{background:#f3f7fc;border-left-color:var(--tuned)}
.scores{margin:10px 0 0;font-size:.84em;color:#444;font-variant-numeric:tabular-nums}
.scores .s{white-space:nowrap;margin-right:.9em;display:inline-block} .good{color:var(--good)} .bad{color:var(--bad)}
@media (max-width:720px){body{padding:12px}.pair{grid-template-columns:1fr}.item{padding:10px 12px}
  #search{max-width:none} .controls{position:static}
  #metrics thead{display:none} #metrics tr{display:block;border:1px solid #ddd;margin:0 0 8px}
  #metrics td{display:block;border:0;text-align:left;max-width:none}
  #metrics td.num:before{content:attr(data-label) ": ";color:#666}
  .chart{overflow-x:auto} .chart img{max-width:none;width:760px}}
"""

JS = """
const list=document.getElementById('items'), cards=[...list.children];
const search=document.getElementById('search'), key=document.getElementById('sort'),
      order=document.getElementById('order'), count=document.getElementById('count');
search.addEventListener('input', () => {
  const q=search.value.toLowerCase(); let shown=0;
  for (const c of cards) { const ok=c.textContent.toLowerCase().includes(q); c.hidden=!ok; shown+=ok; }
  count.textContent=shown;
});
function sort() {
  const attr='data-'+key.value, sign=order.value==='asc'?1:-1;
  const v=c => { const x=parseFloat(c.getAttribute(attr)); return isNaN(x)?null:x; };
  const sorted=[...cards].sort((a,b) => { const x=v(a), y=v(b);
    if (x===null || y===null) return (x===null)-(y===null);  // items without the score go last
    return (x-y)*sign || a.dataset.i-b.dataset.i; });
  sorted.forEach(c => list.appendChild(c));
}
// Picking a score shows the tuned model's best items first: highest, or lowest for a loss.
key.addEventListener('change', () => {
  order.value=(key.value==='i' || key.value.endsWith('loss')) ? 'asc' : 'desc'; sort(); });
order.addEventListener('change', sort);
"""

# per-item scores of answers.csv shown on each item's scores line and offered by the sort control
ITEM_SCORES = [("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("bleu", "BLEU"), ("embedding_cosine", "cosine"),
               ("loss", "loss"), ("length_words", "words"), ("stop_rate", "ended")]


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _text(value: Any) -> str:
    # answers.csv read back by pandas turns an empty answer into NaN: show it empty, not "nan"
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _attr(x: float) -> str:
    return repr(x) if math.isfinite(x) else ""


def _score(name: str, label: str, base: float, tuned: float) -> str:
    """One score of one item: 'ROUGE-L 0.132 → 0.141 +0.009', the change coloured by whether it helps."""
    if name == "stop_rate":
        shown = " → ".join("–" if not math.isfinite(x) else "yes" if x else "no" for x in (base, tuned))
        return f'<span class="s">{_e(label)} {shown}</span>'
    if name == "length_words":  # a count, and longer is neither better nor worse
        shown = " → ".join(f"{x:.0f}" if math.isfinite(x) else "–" for x in (base, tuned))
        return f'<span class="s">{_e(label)} {shown}</span>'
    text = f"{_e(label)} {fmt(base)} → {fmt(tuned)}"
    d = tuned - base
    if math.isfinite(d):
        helps = "good" if d and (d < 0) == (name in LOWER_IS_BETTER) else "bad" if d else ""
        text += f' <b class="{helps}">{fmt(d, signed=True)}</b>'
    return f'<span class="s">{text}</span>'


def _item(i: int, row: dict[str, Any], scores: list[tuple[str, str]]) -> str:
    """One test item: title, question, reference, the two answers side by side, its scores on one line."""
    data = [f'data-i="{i}"']
    line = []
    for name, label in scores:
        b, t = _num(row[f"base_{name}"]), _num(row[f"tuned_{name}"])
        data += [f'data-b_{name}="{_attr(b)}"', f'data-t_{name}="{_attr(t)}"', f'data-d_{name}="{_attr(t - b)}"']
        line.append(_score(name, label, b, t))
    title = _text(row.get("title")) or _text(row.get("uid"))
    return (f'<article class="item" {" ".join(data)}>'
            f'<h3><span class="n">#{i}</span>{_e(title)}</h3>'
            f'<div class="q"><span class="label">Question</span><span class="text">{_e(row["question"])}</span></div>'
            f'<div class="ref"><span class="label">Reference</span>'
            f'<span class="text">{_e(row["reference"])}</span></div>'
            f'<div class="pair">'
            f'<div class="answer base"><span class="label">Base model</span>'
            f'<span class="text">{_e(row["base_answer"])}</span></div>'
            f'<div class="answer tuned"><span class="label">Tuned model</span>'
            f'<span class="text">{_e(row["tuned_answer"])}</span></div></div>'
            f'<p class="scores">{"".join(line)}</p></article>')


def _sort_control(scores: list[tuple[str, str]]) -> str:
    options = ['<option value="i">test file order</option>']
    for name, label in scores:
        options.append(f'<optgroup label="{_e(label)}">' + "".join(
            f'<option value="{p}_{name}">{_e(label)}: {what}</option>'
            for p, what in (("d", "tuned − base"), ("t", "tuned"), ("b", "base"))) + "</optgroup>")
    return (f'<label>Sort by <select id="sort">{"".join(options)}</select></label> '
            '<select id="order" aria-label="order"><option value="asc">lowest first</option>'
            '<option value="desc">highest first</option></select>')


def _in_short(metrics: dict[str, Any]) -> str:
    """One sentence: on which metrics the tuned model is better, worse, not clearly different, or just changed."""
    groups: dict[str, list[str]] = {}
    for name in metrics["base"]:
        groups.setdefault(verdict(name, metrics["diff"][name]), []).append(name)
    said = [f"<b>{what}</b> on {_e(', '.join(groups[v]))}" for v, what in
            (("better", "better"), ("worse", "worse"), ("same", "no clear difference")) if v in groups]
    said += [f"{_e(', '.join(groups[v]))} {v} (neither better nor worse)" for v in ("higher", "lower") if v in groups]
    return "The tuned model: " + "; ".join(said) + "."


def render_html(metrics: dict[str, Any], table: Any, info: dict[str, Any],
                train_log: list[dict[str, Any]]) -> str:
    """report.html: metric table, metric chart, loss curves and every item, its two answers side by side."""
    metric_rows = []
    for name in metrics["base"]:
        diff = metrics["diff"][name]
        metric_rows.append(
            f'<tr><td class="metric"><b>{_e(name)}</b><br><span class="muted">{_e(METRICS.get(name, ""))}</span></td>'
            f'<td class="num" data-label="base">{_e(fmt_interval(metrics["base"][name]))}</td>'
            f'<td class="num" data-label="tuned">{_e(fmt_interval(metrics["tuned"][name]))}</td>'
            f'<td class="num {verdict(name, diff)}" data-label="tuned − base">'
            f'{_e(fmt_interval(diff, signed=True))}</td></tr>')
    if any(steps for steps, _ in loss_series(train_log).values()):
        loss_png = png_base64(loss_figure(train_log, "Training and validation loss"))
        loss_html = f'<img alt="training and validation loss" src="data:image/png;base64,{loss_png}">'
    else:
        loss_html = '<p class="muted">No training log (train/log.jsonl) found.</p>'

    scores = [(k, h) for k, h in ITEM_SCORES if f"base_{k}" in table.columns and f"tuned_{k}" in table.columns]
    items = [_item(i, row._asdict(), scores) for i, row in enumerate(table.itertuples(index=False), 1)]
    settings = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items())
    chart = png_base64(metrics_figure(metrics))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>prodtune: base vs tuned ({_e(info.get("run", ""))})</title>
<style>{CSS}</style></head><body>
<h1>Base vs tuned: {_e(info.get("run", ""))}</h1>
<p>{metrics["n"]} held-out {_e(info.get("split", "test"))} items, whose titles never appear in training;
decoding: {_e(info.get("decoding", ""))}. Intervals are 95% bootstrap intervals; the difference
tuned − base is paired (the same resampled items for both), green where the interval shows the
tuned model better, red where worse.</p>
<p>{_in_short(metrics)}</p>
<h2>Metrics</h2>
<div class="scroll"><table id="metrics"><thead><tr><th>metric</th><th>base [95% CI]</th><th>tuned [95% CI]</th>
<th>tuned − base [95% CI]</th></tr></thead><tbody>
{"".join(metric_rows)}
</tbody></table></div>
<div class="chart"><img alt="metrics with 95% intervals" src="data:image/png;base64,{chart}"></div>
<h2>Training loss</h2>
{loss_html}
<h2>Every test item</h2>
<p class="muted">The question, the reference description, then the base and the tuned model's answers
side by side; each item's scores on its last line (base → tuned, and the change, green where it
helps the tuned model).</p>
<div class="controls"><input id="search" type="search" aria-label="search"
placeholder="Search titles, questions, references and answers…">
{_sort_control(scores)}
<span class="muted"><span id="count">{len(items)}</span> of {len(items)} items shown</span></div>
<div id="items">
{"".join(items)}
</div>
<h2>Settings</h2>
<div class="scroll"><table>
{settings}
</table></div>
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
SAYS = {"better": "tuned better", "worse": "tuned worse", "same": "no clear difference",
        "higher": "tuned higher", "lower": "tuned lower"}


def headline(metrics: dict[str, Any], paths: RunPaths) -> str:
    """The lines `prodtune compare` and `prodtune run` print: where the report is, the main metrics, verdicts."""
    items = "held-out" if paths.compare_split == "test" else paths.compare_split
    model = "" if paths.compare_model == "adapter" else f" (tuned = the exported {paths.compare_model})"
    lines = [f"compare: {metrics['n']} {items} items{model}; report: {paths.report_html}",
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
