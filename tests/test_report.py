"""The reports: markup in any field is escaped, the page is self-contained, the tables are complete."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from prodtune.io import RunPaths
from prodtune.metrics import mean_statistic, summarize
from prodtune.report import headline, render_html, render_markdown, write_reports

PAYLOAD = '<script>alert("x")</script>'


def _inputs(n: int = 5):
    rng = np.random.default_rng(0)
    scores = {k: rng.random(n) for k in ("rouge_l", "chrf", "embedding_cosine", "stop_rate")}
    metrics = summarize({k: mean_statistic(v) for k, v in scores.items()},
                        {k: mean_statistic(v + 0.5) for k, v in scores.items()}, n, 100, 0)
    table = pd.DataFrame({
        "uid": [f"u{i}" for i in range(n)],
        "title": [f"Title {i} {PAYLOAD}" for i in range(n)],
        "question": [f"Describe '{PAYLOAD}' <b>now</b>" for _ in range(n)],
        "reference": [f"Ref & <img src=x onerror=alert(1)> {PAYLOAD} | pipe" for _ in range(n)],
        "base_answer": [f"base {PAYLOAD}" for _ in range(n)],
        "tuned_answer": [f"tuned </td></tr></table>{PAYLOAD}" for _ in range(n)],
    })
    for k, v in scores.items():
        table[f"base_{k}"], table[f"tuned_{k}"] = v, v + 0.5
    info = {"run": f"run {PAYLOAD}", "model": PAYLOAD, "decoding": "greedy", "max_new_tokens": 8,
            "bootstrap_samples": 100}
    log = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]
    return metrics, table, info, log


def test_html_escapes_every_field():
    metrics, table, info, log = _inputs()
    page = render_html(metrics, table, info, log)
    assert PAYLOAD not in page
    assert page.count("<script") == 1  # only the page's own search/sort script
    assert "<img src=x" not in page and "</td></tr></table><" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    # every item is in the table, in order
    for i in range(len(table)):
        assert f"Title {i} &lt;script&gt;" in page


class _Page(HTMLParser):
    """Every tag with its attributes, and each item's text by the class of the element holding it."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.items: list[dict] = []
        self._classes: list[str] = []  # class of each open element, innermost last

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "article":
            self.items.append({"attrs": attrs})
        if tag not in ("img", "input", "meta", "br"):
            self._classes.append(attrs.get("class", ""))

    def handle_endtag(self, tag):
        if tag not in ("img", "input", "meta", "br"):
            self._classes.pop()

    def handle_data(self, data):
        if self.items and "item" in self._classes:
            for cls in self._classes[self._classes.index("item"):]:
                self.items[-1][cls] = self.items[-1].get(cls, "") + data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def test_each_item_reads_as_one():
    metrics, table, info, log = _inputs()
    table["base_loss"], table["tuned_loss"] = [3.0, 3.1, 2.9, 3.2, 3.0], [2.5, 3.4, 2.9, 2.0, 2.6]
    table["base_length_words"], table["tuned_length_words"] = 12.0, 30.0
    page = _parse(render_html(metrics, table, info, log))
    assert len(page.items) == len(table)
    for item, row in zip(page.items, table.itertuples()):
        # the question, the reference and both answers, whole and unescaped back to the original text
        assert row.question in item["q"] and row.reference in item["ref"]
        assert row.base_answer in item["answer base"] and row.tuned_answer in item["answer tuned"]
        assert row.title in item["item"]
        # one compact scores line: every score, base -> tuned
        line = item["scores"]
        for label in ("ROUGE-L", "chrF", "cosine", "loss", "words", "ended"):
            assert label in line
        assert f"loss {row.base_loss:.3f} → {row.tuned_loss:.3f}" in line and "words 12 → 30" in line
    first = page.items[0]["attrs"]
    assert float(first["data-d_loss"]) == pytest.approx(2.5 - 3.0)
    assert float(first["data-t_rouge_l"]) == pytest.approx(table["tuned_rouge_l"][0])


def test_the_sort_control_offers_every_score_and_each_item_carries_it():
    metrics, table, info, log = _inputs()
    page = _parse(render_html(metrics, table, info, log))
    keys = [a["value"] for tag, a in page.tags if tag == "option" and a.get("value", "")[:2] in ("d_", "t_", "b_")]
    for name in ("rouge_l", "chrf", "embedding_cosine", "stop_rate"):
        assert {f"d_{name}", f"t_{name}", f"b_{name}"} <= set(keys)
    assert "d_bleu" not in keys  # a score the table lacks is not offered
    for item in page.items:
        assert all(f"data-{k}" in item["attrs"] for k in keys) and item["attrs"]["data-i"].isdigit()


def test_payloads_in_answers_stay_inert():
    metrics, table, info, log = _inputs()
    table["base_answer"] = ['" onerror="alert(1)" x="'] * len(table)
    table["tuned_answer"] = ["<img src=x onerror=alert(1)><svg onload=alert(2)>"] * len(table)
    table["question"] = ["<script>alert(3)</script>"] * len(table)
    page = _parse(render_html(metrics, table, info, log))
    assert [tag for tag, _ in page.tags].count("script") == 1  # the page's own
    assert not [(t, k) for t, attrs in page.tags for k in attrs if k.startswith("on")]  # no event handler
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in page.tags if t == "img")
    assert "svg" not in [tag for tag, _ in page.tags]
    assert all(item["answer tuned"].endswith("<svg onload=alert(2)>") for item in page.items)  # shown as text


def test_an_empty_answer_read_back_from_csv_shows_empty(tmp_path):
    metrics, table, info, log = _inputs(2)
    table.loc[0, "base_answer"] = ""
    table.to_csv(tmp_path / "answers.csv", index=False)
    page = _parse(render_html(metrics, pd.read_csv(tmp_path / "answers.csv"), info, log))
    assert page.items[0]["answer base"] == "Base model"  # the label alone, not "nan"


def test_the_two_answers_stack_at_a_phone_width():
    page = render_html(*_inputs())
    phone = re.search(r"@media \(max-width:(\d+)px\)\{(.*?)\n", page, re.S)
    assert phone and 390 < int(phone.group(1)) < 900
    assert ".pair{grid-template-columns:1fr}" in phone.group(2)
    assert 'name="viewport" content="width=device-width' in page


def test_html_is_self_contained():
    page = render_html(*_inputs())
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN, no remote image
    assert page.count("data:image/png;base64,") == 2  # metric chart + loss curves
    assert 'id="search"' in page and "sort(" in page


def test_html_without_training_log_says_so():
    metrics, table, info, _ = _inputs()
    page = render_html(metrics, table, info, [])
    assert page.count("data:image/png;base64,") == 1 and "No training log" in page


def test_markdown_escapes_markup_and_lists_metrics():
    metrics, table, info, _ = _inputs()
    md = render_markdown(metrics, table, info)
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    for name in ("rouge_l", "chrf", "embedding_cosine", "stop_rate"):
        assert f"| {name} |" in md
    assert "\\| pipe" in md  # a | inside text cannot break the table


def test_write_reports_reads_the_training_log(tmp_path):
    metrics, table, info, log = _inputs()
    paths = RunPaths(tmp_path)
    paths.train.mkdir(parents=True)
    paths.train_log.write_text("\n".join(json.dumps(r) for r in log) + "\nnot json\n")
    write_reports(paths, metrics, table, info)
    assert paths.report_html.read_text().count("data:image/png;base64,") == 2
    assert paths.report_md.read_text().startswith("# Base vs tuned")


def _entry(mean, lo, hi):
    return {"mean": mean, "ci95": [lo, hi]}


def test_headline_reads_the_loss_the_right_way_round(tmp_path):
    metrics = {"n": 30,
               "base": {"rouge_l": _entry(0.13, 0.11, 0.15), "loss": _entry(3.89, 3.7, 4.1),
                        "length_words": _entry(80, 70, 90)},
               "tuned": {"rouge_l": _entry(0.14, 0.12, 0.16), "loss": _entry(3.33, 3.1, 3.5),
                         "length_words": _entry(85, 75, 95)},
               "diff": {"rouge_l": _entry(0.009, -0.001, 0.019), "loss": _entry(-0.56, -0.77, -0.41),
                        "length_words": _entry(5, 1, 9)}}
    text = headline(metrics, RunPaths(tmp_path))
    lines = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert str(RunPaths(tmp_path).report_html) in text and "30 held-out items" in text
    assert set(lines) == {"ROUGE-L", "loss"}  # length has no direction: not a headline number
    assert "3.890 -> 3.330" in lines["loss"] and "-0.560 [-0.770, -0.410]" in lines["loss"]
    assert "tuned better" in lines["loss"]  # a lower loss is the better one
    assert "no clear difference" in lines["ROUGE-L"] and "+0.009 [-0.001, +0.019]" in lines["ROUGE-L"]
    metrics["diff"]["loss"] = _entry(0.56, 0.41, 0.77)
    assert "tuned worse" in headline(metrics, RunPaths(tmp_path, "validation"))

