"""Stage 1 (clean): each rule on dirty fixtures, the report, bad input, formats, chunking, atomic output."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import prodtune.clean as clean
import prodtune.rawdata as rawdata
from prodtune.clean import clean_data, clean_stage
from prodtune.rules import (cap_text, clean_text, is_review_blurb, normalize_text, remove_boilerplate, strip_tags,
                            text_key, unescape_entities)
from prodtune.config import DataConfig, load_config
from prodtune.errors import UserError
from prodtune.io import RunPaths, read_json
from prodtune.synth import make_rows, write_raw

FIXTURES = Path(__file__).parent / "fixtures"
DIRTY = FIXTURES / "dirty.jsonl"
BAD = FIXTURES / "bad_lines.jsonl"
ALPACA = FIXTURES / "alpaca.json"


def run(tmp_path: Path, raw: Path | str, **data: object) -> tuple[dict, dict[str, dict]]:
    """Clean raw into tmp_path/out; returns the report and the kept rows by uid."""
    report = clean_data(DataConfig(raw_path=str(raw), **data), _fresh(tmp_path / "out"), progress=False)
    rows = pq.read_table(tmp_path / "out" / "clean.parquet").to_pylist()
    return report, {r["uid"]: r for r in rows}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- one string

def test_entities_are_unescaped_twice_when_double_escaped():
    assert unescape_entities("Kerr&#8217;s &amp; &quot;Mog&quot;") == "Kerr’s & \"Mog\""
    assert unescape_entities("It&amp;#8217;s") == "It’s"
    assert unescape_entities("AT&T and R&D") == "AT&T and R&D"


def test_tags_go_and_block_tags_leave_a_space():
    assert strip_tags("<p>Great <b>bold</b> toy.</p>Next<br>line<br />") == "Great bold toy. Next line"
    assert strip_tags("size < 5 and <!-- note -->x > 2") == "size < 5 and x > 2"


@pytest.mark.parametrize("text, want", [
    ("Told well.--This text refers to thePaperbackedition.", "Told well."),
    ("Sea.--This text refers to an out of print or unavailable edition of this title.", "Sea."),
    ("Pictures. This text refers to the Hardcover edition. Reviewed by Ann.", "Pictures. Reviewed by Ann."),
    ("A.--This text refers to thePrint on Demand (Paperback)edition.", "A."),
    ("Kindle.--This text refers to theKindle Editionedition.", "Kindle."),
    ("--This text refers to thePaperbackedition.", ""),
    ("Our text refers to this edition.", "Our text refers to this edition."),
])
def test_boilerplate_variants(text, want):
    assert remove_boilerplate(text) == want


def test_normalize_nfkc_invisible_and_whitespace():
    assert normalize_text("\uff21\uff42c  \ufb01ne\u00a0x\u200by\tz\r\nw ") == "Abc fine xy z w"
    assert normalize_text("Cafe\u0301") == "Café"


def test_cap_cuts_at_a_sentence_then_a_word():
    text = "First sentence here. Second sentence is longer than that. Third."
    assert cap_text(text, 40) == "First sentence here."
    assert cap_text("word " * 20, 23) == "word word word word"
    assert cap_text("short", 40) == "short"


@pytest.mark.parametrize("text, blurb", [
    ("'Startlingly good...tense...ingenious' Sunday Express 'Alistair MacLean is a magnificent storyteller' "
     "Sunday Mirror", True),
    ("\u201cA humane, big-hearted and sometimes devastatingly funny book.\u201d (LA Weekly)", True),
    # No quotation marks, but two publications named in a short text.
    ("Brilliantly organised guide ... so comprehensive and above all easy to use. The Sunday Times "
     "Superbly handy and comprehensive guide. The Observer", True),
    # A description with apostrophes and one short quotation is kept.
    ("Harvey Penick's little book doesn't need gadgets: the lessons he taught in the 'pre-gadget days' "
     "still stand, and the swing is basically the same as it was in 1950 for every golfer.", False),
    ("The Times is a British daily national newspaper; this book collects its cryptic crosswords, with "
     "solutions and hints for beginners.", False),
    ("Delhi has a richly layered past, and Dalrymple deftly peels away each layer.", False),
])
def test_review_blurbs_are_told_from_descriptions(text, blurb):
    assert is_review_blurb(text) is blurb


def test_text_key_ignores_case_and_punctuation():
    assert text_key("The Prophet.") == text_key("the  prophet") == "theprophet"


def test_clean_text_applies_rules_in_order():
    d = DataConfig()
    assert clean_text("&lt;b&gt;Bold&lt;/b&gt; &amp;amp; more", d) == "Bold & more"
    assert clean_text("Rock &amp; Roll <i>Hits</i>", d, content=False) == "Rock & Roll Hits"


# ----------------------------------------------------------------------------- the rules on a file

def test_each_rule_on_the_dirty_fixture(tmp_path):
    report, rows = run(tmp_path, DIRTY)
    assert report["rows_read"] == 18
    assert report["dropped"] == {"bad_input": 0, "missing": 3, "no_answer": 0, "too_short": 1, "content_is_title": 1,
                                 "review_blurb": 0, "duplicate": 2, "duplicate_title": 0}
    assert report["changed"] == {"entities": 3, "html": 3, "boilerplate": 5, "unicode": 4, "capped": 1}
    assert set(rows) == {"d01", "d02", "d03", "d04", "d05", "d06", "d07", "d14", "d15", "d16", "d18"}
    assert rows["d01"]["title"] == "Mog's Kittens"
    assert rows["d01"]["content"] == 'Judith Kerr’s best–selling cat & her "kittens" for young readers.'
    assert rows["d02"]["content"] == 'It’s a "classic" edition for every shelf at home.'
    assert rows["d03"]["content"] == "Great bold toy for kids. Second line of the description."
    assert rows["d04"]["content"] == "A fine history of Rome, told well."
    assert rows["d05"]["content"] == "A well reviewed novel about the sea and ships."
    assert rows["d06"]["content"] == "Lovely pictures on every page. Reviewed by Ann."
    assert rows["d07"]["title"] == "Fullwidth Title"
    assert rows["d07"]["content"] == "Café fine print, zero width and spaces tabs newline."
    assert len(rows["d14"]["content"]) <= 2000 and rows["d14"]["content"].endswith("description.")
    assert rows["d18"]["title"] == "Rock & Roll Hits"


def test_report_counts_add_up_and_show_examples(tmp_path):
    report, rows = run(tmp_path, DIRTY)
    assert report["rows_read"] == report["rows_kept"] + sum(report["dropped"].values())
    assert report["rows_kept"] == len(rows)
    for rule, n in {**report["dropped"], **report["changed"]}.items():
        assert len(report["examples"].get(rule, [])) == min(n, 3), rule
    ex = report["examples"]["boilerplate"][0]
    assert "This text refers to" in ex["before"] and "This text refers to" not in ex["after"]
    assert report["examples"]["duplicate"][0]["uid"] == "d12"
    assert report["examples"]["missing"][0]["uid"] == "d10"


@pytest.mark.parametrize("switch, rule, dirt", [
    ("unescape_entities", "entities", "&#8217;"),
    ("strip_html", "html", "<b>"),
    ("remove_boilerplate", "boilerplate", "This text refers to"),
    ("normalize_unicode", "unicode", "\u00a0"),
])
def test_each_edit_rule_can_be_switched_off(tmp_path, switch, rule, dirt):
    report, rows = run(tmp_path, DIRTY, **{switch: False})
    assert report["changed"][rule] == 0
    assert any(dirt in r["content"] for r in rows.values())


def test_drop_rules_switched_off(tmp_path):
    report, rows = run(tmp_path, DIRTY, min_content_chars=0, drop_content_equals_title=False,
                       max_content_chars=0, dedupe=False, drop_review_blurbs=False)
    assert report["dropped"]["too_short"] == report["dropped"]["content_is_title"] == 0
    assert report["dropped"]["duplicate"] == report["changed"]["capped"] == 0
    assert {"d08", "d09", "d12", "d13"} <= set(rows)
    assert len(rows["d14"]["content"]) > 2000


def test_one_per_title_keeps_the_first_of_each_normalised_title(tmp_path):
    report, rows = run(tmp_path, DIRTY, one_per_title=True)
    assert report["dropped"]["duplicate_title"] == 1
    assert "d01" in rows and "d15" not in rows  # "MOG'S KITTENS!" is "Mog's Kittens" normalised


def test_drop_missing_off_keeps_values_as_text(tmp_path):
    report, rows = run(tmp_path, BAD, drop_missing=False, min_content_chars=0)
    assert report["dropped"]["missing"] == 0
    assert rows["b5"]["title"] == "12345" and rows["b6"]["content"] == ""


def test_duplicates_are_found_across_chunks(tmp_path):
    whole, _ = run(tmp_path, DIRTY)
    report, rows = run(tmp_path, DIRTY, chunk_rows=2)  # d04/d12 and d05/d13 are in other chunks
    assert report["dropped"] == whole["dropped"] and report["changed"] == whole["changed"]
    assert "d12" not in rows and "d13" not in rows


def test_slow_line_by_line_parse_gives_the_same_rows(tmp_path, monkeypatch):
    fast, fast_rows = run(tmp_path, DIRTY, chunk_rows=5)
    monkeypatch.setattr(rawdata, "_parse_arrow", lambda chunk, drop_empty: None)
    slow, slow_rows = run(tmp_path, DIRTY, chunk_rows=5)
    assert slow_rows == fast_rows
    assert (slow["dropped"], slow["changed"]) == (fast["dropped"], fast["changed"])


def test_worker_processes_give_the_same_file(tmp_path, monkeypatch):
    raw = write_raw(tmp_path / "raw.json", 3000, seed=1)
    _, one = run(tmp_path, raw, chunk_rows=400, clean_workers=1)
    monkeypatch.setattr(clean, "POOL_MIN_BYTES", 0)
    report, two = run(tmp_path, raw, chunk_rows=400, clean_workers=2)
    assert report["workers"] == 2
    assert list(two.items()) == list(one.items())  # same rows, same order


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import os
    from concurrent.futures.process import BrokenProcessPool

    raw = write_raw(tmp_path / "raw.json", 2000, seed=1)
    monkeypatch.setattr(clean, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(clean, "clean_chunk", lambda chunk, data: os._exit(9))  # as if killed (OOM)
    with pytest.raises(BrokenProcessPool):
        run(tmp_path, raw, chunk_rows=500, clean_workers=2)


# ----------------------------------------------------------------------------- bad input

def test_bad_lines_are_reported_by_line_and_good_rows_kept(tmp_path, caplog):
    assert BAD.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in BAD.read_bytes()  # fixture intact
    with caplog.at_level(logging.WARNING, logger="prodtune.clean"):
        report, rows = run(tmp_path, BAD)
    assert set(rows) == {"b1", "b2", "b11", "b13"}
    assert report["rows_read"] == 12  # 13 lines, one blank
    assert report["dropped"]["bad_input"] == 4 and report["dropped"]["missing"] == 4
    problems = report["problems"]["listed"]
    assert report["problems"]["count"] == len(problems) == 8
    for line, words in [(3, "not valid JSON"), (5, "'title' is a number"), (6, "'content' is null"),
                        (7, "no 'content' field"), (8, "not valid UTF-8"), (9, "not a JSON object"),
                        (10, "lone surrogate"), (12, "'content' is a list")]:
        assert any(p.startswith(f"bad_lines.jsonl line {line}: ") and words in p for p in problems), line
    warned = [r.getMessage() for r in caplog.records]
    assert warned[:5] == problems[:5]
    assert "3 more problems" in warned[5]
    assert report["examples"]["bad_input"][0]["line"] == 3


def test_empty_or_blank_file_is_one_clear_error(tmp_path):
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(UserError, match="empty.json' is empty"):
        run(tmp_path, tmp_path / "empty.json")
    (tmp_path / "blank.json").write_bytes(b"\n  \r\n\n")
    with pytest.raises(UserError, match="nothing to clean"):
        run(tmp_path, tmp_path / "blank.json")


def test_missing_input_or_a_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no/such/trn.json' not found"):
        run(tmp_path, "no/such/trn.json")
    with pytest.raises(UserError, match="is a folder"):
        run(tmp_path, FIXTURES)


def test_all_rows_dropped_still_writes_a_valid_empty_table(tmp_path, caplog):
    raw = tmp_path / "short.json"
    raw.write_text('{"uid": "a", "title": "T", "content": "tiny"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="prodtune.clean"):
        report, rows = run(tmp_path, raw)
    assert report["rows_kept"] == 0 and rows == {}
    assert "all 1 rows were dropped" in caplog.text


# ----------------------------------------------------------------------------- formats

def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path):
    plain, plain_rows = run(tmp_path, DIRTY)
    for name in ("trn.json.gz", "trn.json"):
        raw = tmp_path / name
        raw.write_bytes(gzip.compress(DIRTY.read_bytes()))
        report, rows = run(tmp_path, raw, chunk_rows=4)
        assert rows == plain_rows and report["dropped"] == plain["dropped"]


def test_truncated_gzip_keeps_the_rows_before_the_break(tmp_path):
    data = b"".join(json.dumps(r).encode() + b"\n" for r in make_rows(3000, seed=2))
    whole = gzip.compress(data)
    raw = tmp_path / "cut.json.gz"
    raw.write_bytes(whole[: len(whole) // 2])
    report, rows = run(tmp_path, raw, chunk_rows=500)
    problem = report["problems"]["listed"][-1]
    assert "ends early or is corrupt" in problem
    broken_line = int(problem.split(" line ")[1].split(":")[0])
    assert 100 < broken_line < 3000
    assert report["rows_read"] == broken_line - 1  # every complete line before the break
    head = tmp_path / "head.json"
    head.write_bytes(b"".join(data.splitlines(keepends=True)[: broken_line - 1]))
    _, head_rows = run(tmp_path, head)
    assert rows == head_rows


def test_alpaca_array_with_made_up_uids(tmp_path):
    report, rows = run(tmp_path, ALPACA)
    assert report["rows_read"] == 4
    assert rows["item0"]["title"] == "Girls Ballet Tutu Neon Pink"
    assert rows["item1"]["content"] == "Judith Kerr’s best–selling adventures of that endearing cat Mog."
    assert report["dropped"]["too_short"] == 1 and report["dropped"]["missing"] == 1


def test_alpaca_array_on_one_line_in_small_chunks(tmp_path):
    raw = tmp_path / "one_line.json"
    raw.write_text(json.dumps(json.loads(ALPACA.read_text(encoding="utf-8"))), encoding="utf-8")
    report, rows = run(tmp_path, raw, chunk_rows=1)
    assert set(rows) == {"item0", "item1"}


def test_broken_alpaca_array_keeps_elements_before_the_error(tmp_path):
    raw = tmp_path / "broken.json"
    raw.write_text(ALPACA.read_text(encoding="utf-8")[:-30], encoding="utf-8")
    report, rows = run(tmp_path, raw)
    assert set(rows) == {"item0", "item1"}
    assert "broken.json line" in report["problems"]["listed"][-1]


def test_hub_dataset_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="hf:x/y.*could not stream.*OfflineModeIsEnabled"):
        run(tmp_path, "hf:x/y")


def test_hub_dataset_rows_are_cleaned(tmp_path, monkeypatch):
    import datasets

    rows = [{"uid": "h1", "title": "Hub Row", "content": "A row streamed from the hub &amp; cleaned."},
            {"uid": "h2", "title": "Hub Row", "content": None}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    report, kept = run(tmp_path, "hf:x/y")
    assert kept["h1"]["content"] == "A row streamed from the hub & cleaned."
    assert report["dropped"]["missing"] == 1
    assert report["problems"]["listed"] == ["hf:x/y row 2: 'content' is null, not a string; dropped"]


# ----------------------------------------------------------------------------- the stage

def test_stage_writes_parquet_csv_and_report(tmp_path):
    from prodtune.stages import run_stage

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.raw_path={DIRTY}", "data.write_csv=true"])
    report = run_stage(cfg, "clean")
    paths = RunPaths(tmp_path)
    assert read_json(paths.clean_report)["rows_kept"] == report["rows_kept"] == 11
    assert pq.read_table(paths.clean_parquet).column_names == ["uid", "title", "content"]
    import pyarrow.csv as pacsv

    assert pacsv.read_csv(paths.clean / "clean.csv").num_rows == 11
    assert str(paths.clean_parquet) in report["summary"] and paths.config.is_file()


def test_a_failure_mid_write_leaves_no_half_file(tmp_path, monkeypatch):
    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.raw_path={DIRTY}", "data.chunk_rows=3"])
    real, calls = clean.clean_chunk, []

    def fail_on_third(chunk, data):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(chunk, data)

    monkeypatch.setattr(clean, "clean_chunk", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        clean_stage(cfg)
    paths = RunPaths(tmp_path)
    assert not paths.clean.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder, no config written


def test_a_failed_rerun_keeps_the_previous_output(tmp_path, monkeypatch):
    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.raw_path={DIRTY}"])
    clean_stage(cfg)
    before = RunPaths(tmp_path).clean_parquet.read_bytes()
    monkeypatch.setattr(clean, "clean_chunk", lambda chunk, data: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        clean_stage(cfg)
    assert RunPaths(tmp_path).clean_parquet.read_bytes() == before


def test_the_shipped_sample(tmp_path, sample_raw):
    report, rows = run(tmp_path, sample_raw)
    assert report["rows_read"] == 500
    # 2 contents under 20 characters, plus one that is short once its boilerplate is gone ...
    assert report["dropped"]["too_short"] == 3
    # ... and one that was nothing but boilerplate.
    assert report["dropped"]["missing"] == 1
    assert report["dropped"]["content_is_title"] == 1
    assert report["changed"]["boilerplate"] == 119
    # The first 500 records are mostly books: 220 contents are press praise, not descriptions.
    assert report["dropped"]["review_blurb"] == 220 and report["rows_kept"] == 275
    assert all(not is_review_blurb(r["content"]) for r in rows.values())
    # With the rule off, the 494 rows of the other rules, among them two reviews of "Somebody Else's
    # Kids" that differ only in whitespace (with the rule on they go as blurbs first).
    report, _ = run(tmp_path, sample_raw, drop_review_blurbs=False)
    assert report["dropped"]["duplicate"] == 1 and report["dropped"]["review_blurb"] == 0
    assert report["rows_kept"] == 494
    for row in rows.values():
        assert "This text refers to" not in row["content"] and "&#" not in row["content"]
        assert row["content"] == row["content"].strip() and "  " not in row["content"]


# ----------------------------------------------------------------------------- the generator

def test_synth_is_deterministic_and_shaped_like_trn_json(tmp_path):
    a = write_raw(tmp_path / "a.json", 2000, seed=7).read_bytes()
    assert a == write_raw(tmp_path / "b.json", 2000, seed=7).read_bytes()
    rows = [json.loads(line) for line in a.splitlines()]
    assert set(rows[0]) == {"uid", "title", "content", "target_ind", "target_rel"}
    empty = sum(not r["content"] for r in rows) / len(rows)
    assert 0.35 < empty < 0.55
    text = a.decode()
    for dirt in ("&#", "&amp;#", "<br", "This text refers to", "\\u00a0"):
        assert dirt in text or dirt.replace("\\u00a0", "\u00a0") in text, dirt
    assert gzip.decompress(write_raw(tmp_path / "c.json.gz", 2000, seed=7).read_bytes()) == a
