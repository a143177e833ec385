"""Chat datasets: OpenAI/TRL `messages` and ShareGPT `conversations` rows through clean and format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prodtune.chat import parse_conversation, split_conversation
from prodtune.clean import clean_data
from prodtune.config import DEFAULT_SYSTEM_PROMPT, DataConfig, load_config
from prodtune.io import RunPaths, read_jsonl
from prodtune.prompts import SPLITS, format_stage, normalize_title

CHAT = Path(__file__).parent / "fixtures" / "chat.jsonl"


def run(tmp_path: Path, raw: Path, **data: object) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = clean_data(DataConfig(raw_path=str(raw), **data), out, progress=False)
    return report, pq.read_table(out / "clean.parquet").to_pylist()


def conversations() -> list[dict]:
    return [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- one conversation

def test_roles_are_normalised_and_content_parts_joined():
    messages, why = parse_conversation([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
                                        {"role": "user", "content": [{"type": "text", "text": "More?"}]},
                                        {"role": "assistant", "content": "Yes."}])
    assert why == "" and [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "More?"


@pytest.mark.parametrize("value, words", [
    ("not json", "is text, not a list of messages"), ({"role": "user"}, "is an object, not a list"),
    ([{"role": "tool", "content": "{}"}], "message 1 has role 'tool'"),
    ([{"role": "user", "content": 5}], "message 1 (user) has a number content"),
    (["hi"], "message 1 is a string, not an object"),
])
def test_a_conversation_that_cannot_be_used_says_why(value, words):
    messages, why = parse_conversation(value)
    assert messages is None and words in why


def test_the_last_answer_is_the_completion_and_earlier_turns_the_prompt():
    messages = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a."},
                {"role": "user", "content": "B?"}, {"role": "assistant", "content": "b."},
                {"role": "user", "content": "thanks"}]
    prompt, completion = split_conversation(messages, "Be kind.")
    assert completion == [{"role": "assistant", "content": "b."}]
    assert [m["content"] for m in prompt] == ["Be kind.", "A?", "a.", "B?"]  # the turn after the answer goes
    own = [{"role": "system", "content": "Own."}] + messages
    assert split_conversation(own, "Be kind.")[0][0] == {"role": "system", "content": "Own."}


# ----------------------------------------------------------------------------- clean

def test_the_chat_fixture_is_cleaned_and_the_unanswered_row_counted(tmp_path):
    report, rows = run(tmp_path, CHAT)
    assert report["mapping"]["kind"] == "chat" and report["mapping"]["chat"] == "messages"
    assert report["rows_read"] == 120 and report["dropped"]["no_answer"] == 1
    assert report["examples"]["no_answer"][0]["uid"] == "P0015"
    assert report["rows_kept"] + sum(report["dropped"].values()) == report["rows_read"]
    assert report["dropped"]["review_blurb"] == 0  # a rule for product descriptions only
    by_uid = {r["uid"]: r for r in rows}
    assert list(rows[0]) == ["uid", "title", "content", "messages"]
    mog = by_uid["P0001"]  # entities unescaped in the answer, the title is the first user message
    assert "Kerr’s best–selling" in mog["content"] and mog["title"] == "What is 'Mog's Kittens' about?"
    assert mog["messages"][-1]["content"] == mog["content"]
    assert [m["role"] for m in by_uid["P0012"]["messages"]] == ["system", "user", "assistant"]  # human/gpt
    assert by_uid["P0010"]["content"].startswith("American Baptist pastor")  # content parts
    assert len(by_uid["P0017"]["messages"]) == 5  # system + two turns
    assert all("This text refers to" not in m["content"] for r in rows for m in r["messages"])


def test_text_rules_apply_to_every_message_and_the_cap_to_the_last_answer(tmp_path):
    long_answer = "A sentence about the product. " * 100
    raw = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Answer   <b>briefly</b>."},
        {"role": "user", "content": "Is it safe &amp; sound?"},
        {"role": "assistant", "content": long_answer},
        {"role": "user", "content": "And&nbsp;the second?"},
        {"role": "assistant", "content": "It is <i>fine</i> &amp; robust, see the label."}]}])
    report, rows = run(tmp_path, raw, max_content_chars=30)
    messages = rows[0]["messages"]
    assert [m["content"] for m in messages] == ["Answer briefly.", "Is it safe & sound?", long_answer.strip(),
                                                "And the second?", "It is fine & robust, see the"]
    assert rows[0]["content"] == "It is fine & robust, see the" and rows[0]["title"] == "Is it safe & sound?"
    assert report["changed"]["html"] == report["changed"]["entities"] == report["changed"]["capped"] == 1


def test_bad_and_missing_conversations_are_counted_never_fatal(tmp_path):
    raw = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "What is a tutu?"},
                      {"role": "assistant", "content": "A skirt worn by ballet dancers, in layers of net."}]},
        {"messages": [{"role": "tool", "content": "{}"}]},
        {"messages": None},
        {"messages": []},
        {"messages": [{"role": "user", "content": "Hello?"}]},
        {"text": "no conversation here"}])
    report, rows = run(tmp_path, raw)
    assert len(rows) == 1 and report["rows_read"] == 6
    assert report["dropped"]["bad_input"] == 1 and report["dropped"]["missing"] == 3
    assert report["dropped"]["no_answer"] == 1
    assert any("line 2: 'messages' message 1 has role 'tool'" in p for p in report["problems"]["listed"])


def test_sharegpt_file_and_chat_parquet_clean_like_the_messages_file(tmp_path):
    _, want = run(tmp_path, CHAT)
    share = [{"id": c["id"], "conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                                "value": m["content"]} for m in c["messages"]]}
             for c in conversations()]
    _, got = run(tmp_path, write_jsonl(tmp_path / "sharegpt.jsonl", share))
    assert got == want
    table = pa.Table.from_pylist([c for c in conversations() if c["id"] not in ("P0010",)])  # one text type
    pq.write_table(table, tmp_path / "chat.parquet")
    report, got = run(tmp_path, tmp_path / "chat.parquet")
    assert report["format"] == "parquet" and got == [r for r in want if r["uid"] != "P0010"]


def test_duplicate_conversations_and_one_per_first_question(tmp_path):
    rows = conversations()[:3]
    twin = json.loads(json.dumps(rows[1]))
    twin["id"] = "copy"
    other = json.loads(json.dumps(rows[2]))
    other["id"], other["messages"][-1]["content"] = "again", "A different answer to the same first question."
    other["messages"][0]["content"] = other["messages"][0]["content"].upper()
    raw = write_jsonl(tmp_path / "chat.jsonl", [*rows, twin, other])
    report, kept = run(tmp_path, raw)
    assert report["dropped"]["duplicate"] == 1 and "copy" not in {r["uid"] for r in kept}
    report, kept = run(tmp_path, raw, one_per_title=True)
    assert report["dropped"]["duplicate_title"] == 1 and "again" not in {r["uid"] for r in kept}


# ----------------------------------------------------------------------------- format

def test_format_keys_splits_by_the_first_user_message(tmp_path):
    raw = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": ["Tell me about THE tutu!", "tell me about the tutu",
                                                                   f"Question number {i}?"][min(i, 2)]},
                                     {"role": "assistant", "content": f"An answer of some length, number {i}."}]}
        for i in range(60)])
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.raw_path={raw}", "data.count_tokens=false",
                             "data.test_fraction=0.3"])
    from prodtune.clean import clean_stage

    clean_stage(cfg)
    report = format_stage(cfg)
    assert report["kind"] == "chat" and report["context_fields"] == {}
    out = {s: read_jsonl(RunPaths(cfg.run_dir).split(s)) for s in SPLITS}
    where = {r["uid"]: s for s, rows in out.items() for r in rows}
    assert where["c0"] == where["c1"]  # one question in two spellings: one split
    keys = {s: {normalize_title(r["prompt"][-1]["content"]) for r in rows} for s, rows in out.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    row = out["train"][0]
    assert row["prompt"][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"].startswith("An answer")
    assert set(report["template_usage"].values()) == {0}  # conversations bring their own questions


def test_a_long_first_question_is_cut_for_the_title(tmp_path):
    question = "Could you please describe, in detail, " + "the product I am looking at " * 10 + "?"
    raw = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": question + str(i)},
                      {"role": "assistant", "content": f"It is a fine product, number {i}."}]} for i in range(20)])
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.raw_path={raw}", "data.count_tokens=false"])
    from prodtune.clean import clean_stage

    clean_stage(cfg)
    format_stage(cfg)
    rows = [r for s in SPLITS for r in read_jsonl(RunPaths(cfg.run_dir).split(s))]
    assert all(len(r["title"]) <= 100 and r["title"].endswith("…") for r in rows)
    assert all(r["prompt"][-1]["content"].startswith("Could you please") for r in rows)
