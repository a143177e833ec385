"""Bring your own data: CSV, TSV, parquet and mapped JSON through the clean stage, the column
mapping, context columns, and the one-line errors for input that cannot be read."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prodtune.clean import clean_data
from prodtune.config import DataConfig
from prodtune.errors import UserError
from prodtune.synth import make_rows, write_raw, write_table

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "trn.json"
SHOP = dict(title_field="product_name", content_field="description", id_field="product_id",
            context_fields=["brand", "category"])


def run(tmp_path: Path, raw: Path | str, **data: object) -> tuple[dict, list[dict]]:
    """Clean raw into a fresh tmp_path/out; the report and the kept rows in file order."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = clean_data(DataConfig(raw_path=str(raw), **data), out, progress=False)
    return report, pq.read_table(out / "clean.parquet").to_pylist()


def sample_head(tmp_path: Path, n: int = 120) -> Path:
    """The sample's first n records as trn.json: the products the fixtures were made from."""
    path = tmp_path / "trn.json"
    path.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the same products in every format

@pytest.mark.parametrize("name", ["products.csv", "products.parquet", "products.csv.gz"])
def test_each_format_keeps_the_rows_trn_json_keeps(tmp_path, name):
    want, want_rows = run(tmp_path, sample_head(tmp_path))
    report, rows = run(tmp_path, FIXTURES / name, **SHOP)
    assert report["rows_read"] == 120 and report["rows_kept"] == want["rows_kept"] == 85
    assert report["dropped"] == want["dropped"] and report["changed"] == want["changed"]
    assert [(r["title"], r["content"]) for r in rows] == [(r["title"], r["content"]) for r in want_rows]
    assert [r["uid"] for r in rows] == [u["uid"].replace("sample", "P") for u in want_rows]
    assert report["mapping"] == {"kind": "product", "title": "product_name", "content": "description",
                                 "id": "product_id", "context": ["brand", "category"], "chat": None}
    assert report["format"] == ("parquet" if name.endswith("parquet") else "csv")


def test_context_columns_are_carried_cleaned_and_counted(tmp_path):
    report, rows = run(tmp_path, FIXTURES / "products.csv", **SHOP)
    assert list(rows[0]) == ["uid", "title", "content", "brand", "category"]
    assert report["context_rows"] == {"brand": sum(bool(r["brand"]) for r in rows), "category": 85}
    assert 0 < report["context_rows"]["brand"] < 85
    jane = next(r for r in rows if r["title"].startswith("Jane's"))
    assert jane["brand"] == "Jane's" and jane["category"] == "Military history"
    assert all(r["brand"] is None or r["brand"] for r in rows)  # an empty cell is absent, not ''


def test_context_gets_the_title_rules(tmp_path):
    raw = tmp_path / "shop.csv"
    raw.write_text("name,description,brand\n"
                   "Mug,\"A large mug for tea, coffee and soup, dishwasher safe.\",\"Tom &amp; <b>Jerry</b>  Co\"\n"
                   "Cup,A small cup for espresso and other short drinks.,\n", encoding="utf-8")
    report, rows = run(tmp_path, raw, title_field="name", content_field="description", context_fields=["brand"])
    assert rows[0]["brand"] == "Tom & Jerry Co" and rows[1]["brand"] is None
    assert report["changed"]["entities"] == report["changed"]["html"] == report["changed"]["unicode"] == 1
    assert {e["field"] for e in report["examples"]["html"]} == {"brand"}


def test_chunk_size_does_not_change_the_result(tmp_path):
    for name in ("products.csv", "products.parquet", "products.csv.gz"):
        whole, whole_rows = run(tmp_path, FIXTURES / name, **SHOP)
        small, small_rows = run(tmp_path, FIXTURES / name, chunk_rows=7, **SHOP)
        assert small_rows == whole_rows, name
        assert (small["dropped"], small["changed"], small["context_rows"]) == \
               (whole["dropped"], whole["changed"], whole["context_rows"])


def test_large_tables_in_worker_processes_match_one_process(tmp_path, monkeypatch):
    import prodtune.clean as clean

    for suffix in (".csv", ".parquet"):
        raw = write_table(tmp_path / f"rows{suffix}", 3000, seed=4)
        _, one = run(tmp_path, raw, chunk_rows=400, clean_workers=1)
        monkeypatch.setattr(clean, "POOL_MIN_BYTES", 0)
        report, two = run(tmp_path, raw, chunk_rows=400, clean_workers=2)
        monkeypatch.undo()
        assert report["workers"] == 2 and two == one, suffix


def test_generated_rows_clean_alike_from_json_csv_and_parquet(tmp_path):
    """The generator's dirt (entities, tags, odd unicode, CRLF inside descriptions) survives the
    CSV writer and reader: all three formats give the same clean rows."""
    _, from_json = run(tmp_path, write_raw(tmp_path / "rows.json", 2000, seed=3))
    for suffix in (".csv", ".tsv", ".parquet", ".csv.gz"):
        _, rows = run(tmp_path, write_table(tmp_path / f"rows{suffix}", 2000, seed=3))
        assert rows == from_json, suffix


# ----------------------------------------------------------------------------- dirty tables

def test_dirty_csv_bom_quoted_newlines_short_row_and_bad_bytes(tmp_path):
    raw = FIXTURES / "dirty_products.csv"
    data = raw.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and b"\r\n" in data and b"\xe9" in data  # fixture intact
    report, rows = run(tmp_path, raw, **SHOP)
    assert report["rows_read"] == 12
    # P0004 is all boilerplate, P0006 has no description; P0005 is cut short, P0009 is not UTF-8;
    # P0011 is press praise.
    assert [r["uid"] for r in rows] == ["P0000", "P0001", "P0002", "P0003", "P0007", "P0008", "P0010"]
    assert report["dropped"]["bad_input"] == 2 and report["dropped"]["missing"] == 2
    assert report["dropped"]["review_blurb"] == 1
    assert report["rows_kept"] + sum(report["dropped"].values()) == report["rows_read"]
    assert report["problems"]["listed"] == [
        "dirty_products.csv row 6: 2 fields instead of 5; skipped",
        "dirty_products.csv row 10: 'description' is not valid UTF-8; skipped (save the file as UTF-8)"]
    by_uid = {r["uid"]: r for r in rows}
    assert "\n" not in by_uid["P0003"]["content"] and by_uid["P0003"]["content"].startswith("In a distant, timeless")
    assert "," in by_uid["P0003"]["content"]  # commas inside a quoted field stay
    assert by_uid["P0000"]["category"] == "Clothing"  # the first column's name lost its BOM


def test_dirty_parquet_null_title_and_null_or_empty_description(tmp_path):
    report, rows = run(tmp_path, FIXTURES / "dirty_products.parquet", **SHOP)
    assert report["rows_read"] == 12 and report["dropped"]["missing"] == 4
    assert report["dropped"]["review_blurb"] == 2  # P0006, P0011
    assert [r["uid"] for r in rows] == ["P0000", "P0001", "P0003", "P0007", "P0009", "P0010"]
    whys = {e["uid"]: e["why"] for e in report["examples"]["missing"]}
    assert whys["P0002"] == "'product_name' is null" and whys["P0005"] == "'description' is null"


def test_a_column_of_numbers_is_the_wrong_type(tmp_path):
    table = pa.table({"name": ["Mug", "Cup", "Pot"], "code": [11, 22, 33], "price": [2.5, 3.0, float("nan")],
                      "tags": [["tea", "large"], [], None], "in_stock": [True, False, None]})
    pq.write_table(table, tmp_path / "codes.parquet")
    report, rows = run(tmp_path, tmp_path / "codes.parquet", title_field="name", content_field="code")
    assert report["rows_kept"] == 0 and report["dropped"]["missing"] == 3
    assert report["problems"]["listed"] == ["codes.parquet: column 'code' holds int64 values, not text: its rows "
                                            "are dropped; set data.content_field to a text column"]
    report, rows = run(tmp_path, tmp_path / "codes.parquet", title_field="name", content_field="code",
                       drop_missing=False, min_content_chars=0, drop_content_equals_title=False,
                       context_fields=["price", "tags", "in_stock"])
    assert [(r["content"], r["price"], r["tags"], r["in_stock"]) for r in rows] == [
        ("11", "2.5", "tea; large", "yes"), ("22", "3", None, "no"), ("33", None, None, None)]


def test_semicolons_tabs_and_unnamed_suffixes(tmp_path):
    body = "name;description\nMug;A large mug for tea, coffee and soup.\n"
    (tmp_path / "eu.csv").write_text(body, encoding="utf-8")
    (tmp_path / "shop.tsv").write_text(body.replace(";", "\t"), encoding="utf-8")
    (tmp_path / "export.txt").write_text(body, encoding="utf-8")
    for name in ("eu.csv", "shop.tsv", "export.txt"):
        report, rows = run(tmp_path, tmp_path / name, title_field="name", content_field="description")
        assert rows == [{"uid": "row1", "title": "Mug", "content": "A large mug for tea, coffee and soup."}], name


def test_truncated_gzip_csv_keeps_the_rows_before_the_break(tmp_path):
    whole = write_table(tmp_path / "rows.csv", 3000, seed=2)
    raw = tmp_path / "cut.csv.gz"
    packed = gzip.compress(whole.read_bytes())
    raw.write_bytes(packed[: len(packed) // 2])
    report, rows = run(tmp_path, raw)
    problem = report["problems"]["listed"][-1]
    assert problem.startswith("cut.csv.gz row ") and "ends early or is corrupt" in problem
    assert 300 < report["rows_read"] < 3000
    _, all_rows = run(tmp_path, whole)
    assert rows == all_rows[: len(rows)] and len(rows) > 100  # nothing before the break is lost


def test_a_parquet_row_group_that_cannot_be_decoded_is_skipped_and_counted(tmp_path):
    rows = [{"uid": f"u{i}", "title": f"Product {i}", "content": f"A plain description of product number {i}."}
            for i in range(300)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(1).column(2)  # content, rows 101-200
    data = bytearray(path.read_bytes())
    start = column.data_page_offset + 20
    data[start:start + 50] = b"\xff" * 50
    path.write_bytes(bytes(data))
    report, kept = run(tmp_path, path)
    assert report["rows_read"] == 300 and report["dropped"]["bad_input"] == 100
    assert [r["uid"] for r in kept] == [f"u{i}" for i in [*range(100), *range(200, 300)]]
    assert report["problems"]["listed"][0].startswith("groups.parquet rows 101-200 (row group 2 of 3): cannot be read")


# ----------------------------------------------------------------------------- mapping

def test_mapped_json_lines_with_context_of_any_type(tmp_path):
    raw = tmp_path / "shop.jsonl"
    records = [{"sku": 7, "name": "Mug", "text": "A large mug for tea, coffee and soup.", "brand": "Acme",
                "price": 12.5},
               {"sku": 8, "name": "Cup", "text": "A small cup for espresso and short drinks.", "price": None,
                "brand": "Caf\ud800"}]  # a lone surrogate escape: shown as '?', the row kept
    raw.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    report, rows = run(tmp_path, raw, title_field="name", content_field="text", id_field="sku",
                       context_fields=["brand", "price"])
    assert rows == [{"uid": "7", "title": "Mug", "content": records[0]["text"], "brand": "Acme", "price": "12.5"},
                    {"uid": "8", "title": "Cup", "content": records[1]["text"], "brand": "Caf?", "price": None}]
    assert report["context_rows"] == {"brand": 2, "price": 1}


def test_json_lines_with_string_context_take_the_fast_path(tmp_path, monkeypatch):
    import prodtune.rawdata as rawdata

    raw = tmp_path / "shop.jsonl"
    raw.write_text("".join(json.dumps({"name": f"Item {i}", "text": f"Description of item {i}, a fine thing.",
                                       "brand": "Acme" if i % 2 else ""}) + "\n" for i in range(50)),
                   encoding="utf-8")
    kw = dict(title_field="name", content_field="text", context_fields=["brand"])
    fast_report, fast = run(tmp_path, raw, **kw)
    monkeypatch.setattr(rawdata, "_parse_arrow", lambda chunk, drop_empty: None)
    slow_report, slow = run(tmp_path, raw, **kw)
    assert fast == slow and fast_report["context_rows"] == {"brand": 25}
    assert fast[0]["uid"] == "line1" and fast[1]["brand"] == "Acme"


def test_alpaca_input_is_context(tmp_path):
    raw = tmp_path / "alpaca.json"
    raw.write_text(json.dumps([
        {"instruction": "Mog's Kittens", "input": "Board book, ages 0-2",
         "output": "Judith Kerr's best-selling cat Mog, now for the very young."},
        {"instruction": "Girls Ballet Tutu", "input": "", "output": "High quality 3 layer ballet tutu for girls."}]),
        encoding="utf-8")
    report, rows = run(tmp_path, raw)
    assert report["mapping"]["context"] == ["input"]
    assert [r["input"] for r in rows] == ["Board book, ages 0-2", None]
    _, rows = run(tmp_path, raw, context_fields=[])
    assert "input" not in rows[0]


@pytest.mark.parametrize("name, overrides, words", [
    ("products.csv", {"title_field": "product_nam", "content_field": "description"},
     "data.title_field 'product_nam' is not a column; its columns: product_id, product_name, description, brand"),
    ("products.csv", {}, "no 'title' column; no 'content' column; data.title_field and data.content_field are unset"),
    ("products.parquet", {**SHOP, "context_fields": ["brand", "colour"]},
     "data.context_fields[1] 'colour' is not a column; its columns: product_id, product_name"),
    ("chat.jsonl", {"id_field": "sku"}, "data.id_field 'sku' is not a column; its keys in the first 100 records: "
                                        "id, messages"),
    ("products.csv", {**SHOP, "context_fields": ["product_name"]}, "'product_name' is already the title"),
    ("chat.jsonl", {"context_fields": ["id"]}, "context_fields applies to product rows"),
])
def test_a_mapping_that_does_not_fit_lists_the_columns(tmp_path, name, overrides, words):
    with pytest.raises(UserError) as err:
        run(tmp_path, FIXTURES / name, **overrides)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "clean.parquet").exists()


# ----------------------------------------------------------------------------- files that are not what they say

def test_a_name_that_contradicts_the_content_names_both(tmp_path):
    cases = {"products.parquet": (FIXTURES / "products.csv", "the name says parquet (.parquet) but the content "
                                                             "is delimited text such as CSV"),
             "products.csv": (FIXTURES / "products.parquet", "the name says CSV (.csv) but the content is parquet"),
             "shop.json": (FIXTURES / "products.csv", "the name says JSON (.json) but the content is delimited text"),
             "shop.tsv": (FIXTURES / "chat.jsonl", "the name says TSV (.tsv) but the content is JSON")}
    for name, (source, words) in cases.items():
        shutil.copy(source, tmp_path / name)
        with pytest.raises(UserError, match=f"'{tmp_path / name}': " + words.replace("(", r"\(").replace(")", r"\)")):
            run(tmp_path, tmp_path / name, **SHOP)
    (tmp_path / "sheet.csv").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(UserError, match="zip archive .*export the sheet as CSV"):
        run(tmp_path, tmp_path / "sheet.csv")


def test_a_cut_parquet_file_is_one_clear_error(tmp_path):
    data = (FIXTURES / "products.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut.parquet': not a readable parquet file \(.*\); it may be cut short"):
        run(tmp_path, tmp_path / "cut.parquet", **SHOP)


def test_hub_config_and_split(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake(ds_id, name=None, split=None, streaming=False):
        calls.append((ds_id, name, split))
        return iter([{"product_name": "Hub Mug", "description": "A mug streamed from the hub, for tea."}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for spec, want in [("hf:shop/items", ("shop/items", None, "train")),
                       ("hf:shop/items:test", ("shop/items", None, "test")),
                       ("hf:shop/items:en:validation", ("shop/items", "en", "validation"))]:
        report, rows = run(tmp_path, spec, title_field="product_name", content_field="description")
        assert calls[-1] == want and rows[0]["uid"] == "row1" and report["format"] == "hub"
    with pytest.raises(UserError, match="write hf:<owner/name>"):
        run(tmp_path, "hf:shop/items:a:b:c")


def test_hub_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        run(tmp_path, "hf:someone/not-cached-anywhere")
    assert "could not stream the Hugging Face dataset" in str(err.value)
    assert "HF_HUB_OFFLINE is set" in str(err.value) and "\n" not in str(err.value)


def test_make_fixtures_rebuilds_the_committed_files(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("products.csv", "chat.jsonl", "dirty_products.csv"):
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name
    assert gzip.decompress((FIXTURES / "products.csv.gz").read_bytes()) == (FIXTURES / "products.csv").read_bytes()
    for name in ("products.parquet", "dirty_products.parquet"):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(FIXTURES / name)), name
    assert len(list(make_rows(1))) == 1  # the generator the large-table tests use


def test_an_empty_uid_is_its_line_on_the_fast_and_the_slow_path(tmp_path, monkeypatch):
    """A JSON-lines record with an empty uid gets its line's uid whichever parser reads its chunk."""
    import prodtune.rawdata as rawdata

    raw = tmp_path / "shop.jsonl"
    raw.write_text("".join(json.dumps({"sku": "" if i == 1 else f"S{i}", "name": f"Item {i}",
                                       "text": f"Description of item {i}, a fine thing."}) + "\n" for i in range(6)),
                   encoding="utf-8")
    kw = dict(title_field="name", content_field="text", id_field="sku")
    _, fast = run(tmp_path, raw, **kw)
    monkeypatch.setattr(rawdata, "_parse_arrow", lambda chunk, drop_empty: None)
    _, slow = run(tmp_path, raw, **kw)
    assert fast == slow
    assert [r["uid"] for r in fast][:3] == ["S0", "line2", "S2"]


@pytest.mark.parametrize("name, text", [("shop.csv", "name,text\nA,B\n"), ("shop.jsonl", '{"title": "A", "content": "B"}\n')])
def test_an_unreadable_input_is_named_with_the_fix(tmp_path, monkeypatch, name, text):
    """The format is sniffed from the file's first bytes; a file that cannot be opened gets the one
    message that names it and the fix, whatever its format."""
    from prodtune import chunks

    raw = tmp_path / name
    raw.write_text(text, encoding="utf-8")

    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(chunks, "open", refuse, raising=False)
    with pytest.raises(UserError, match=r"cannot read it \(Permission denied\); check the path and permissions"):
        run(tmp_path, raw)
