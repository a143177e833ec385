"""Batched generation: left padding gives the same greedy answers as one prompt at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prodtune.config import EvalConfig
from prodtune.generate import (adapter_off, ask, ask_both, generate, load_model,
                               stop_token_ids, trim_at_stop)
from prodtune.io import RunPaths
from tiny_run import make_run, product_rows


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), tiny_model_dir)


@pytest.fixture(scope="module")
def peft_model(tiny_run):
    return load_model(tiny_run.model, RunPaths(tiny_run.run_dir).adapter)


def prompts(n: int = 8) -> list[list[dict]]:
    # Questions of different lengths so batches need real padding.
    rows = product_rows(n)
    for i, row in enumerate(rows):
        row["prompt"][-1]["content"] += " Please." * i
    return [r["prompt"] for r in rows]


def test_batched_equals_one_at_a_time(peft_model):
    model, tok = peft_model
    cfg = EvalConfig(max_new_tokens=10, batch_size=3)
    batched = generate(model, tok, prompts(), cfg)
    single = generate(model, tok, prompts(), replace(cfg, batch_size=1))
    assert batched == single
    assert len(set(batched.answers)) > 1  # not all the same string: the test can tell answers apart


def test_repetition_penalty_keeps_batched_equal_and_changes_answers(peft_model):
    model, tok = peft_model
    cfg = EvalConfig(max_new_tokens=12, batch_size=3, repetition_penalty=2.0)
    batched = generate(model, tok, prompts(), cfg)
    assert batched == generate(model, tok, prompts(), replace(cfg, batch_size=1))
    assert batched.answers != generate(model, tok, prompts(), replace(cfg, repetition_penalty=1.0)).answers


def test_no_repeat_ngram_removes_repeats_and_keeps_batched_equal(peft_model):
    model, tok = peft_model
    cfg = EvalConfig(max_new_tokens=24, batch_size=3, no_repeat_ngram_size=2)
    batched = generate(model, tok, prompts(), cfg)
    assert batched == generate(model, tok, prompts(), replace(cfg, batch_size=1))
    plain = generate(model, tok, prompts(), replace(cfg, no_repeat_ngram_size=0))
    assert batched.answers != plain.answers
    from prodtune.generate import encode_prompts, generate_ids

    stops = stop_token_ids(tok, model)
    new = generate_ids(model, encode_prompts(tok, prompts()), pad_id=tok.pad_token_id, stop_ids=stops,
                       batch_size=3, max_new_tokens=24, no_repeat_ngram_size=2)
    for ids in new:
        ids, _ = trim_at_stop(ids, stops)
        pairs = list(zip(ids, ids[1:]))
        assert len(pairs) == len(set(pairs)), ids  # no token pair twice in one answer


def test_min_new_tokens_holds_back_the_end_of_turn(peft_model):
    model, tok = peft_model
    stop = stop_token_ids(tok, model)[0]

    def eager_to_stop(module, args, output):  # a model that wants to end every answer at once
        output[..., stop] += 100.0
        return output

    hook = model.get_output_embeddings().register_forward_hook(eager_to_stop)
    try:
        cfg = EvalConfig(max_new_tokens=12, batch_size=3)
        quick = generate(model, tok, prompts(), cfg)
        held = generate(model, tok, prompts(), replace(cfg, min_new_tokens=5))
        assert held == generate(model, tok, prompts(), replace(cfg, min_new_tokens=5, batch_size=1))
    finally:
        hook.remove()
    assert all(quick.stopped) and quick.answers == [""] * len(quick.answers)
    assert all(held.stopped)  # it still ends properly, right after the minimum
    assert all(n == 6 for n in held.new_tokens)  # 5 tokens, then the end-of-turn


def test_adapter_off_gives_base_model_answers(peft_model, tiny_run):
    model, tok = peft_model
    cfg = EvalConfig(max_new_tokens=8, batch_size=4)
    with adapter_off(model):
        base = generate(model, tok, prompts(4), cfg).answers
    tuned = generate(model, tok, prompts(4), cfg).answers
    plain, _ = load_model(tiny_run.model, None)
    assert generate(plain, tok, prompts(4), cfg).answers == base
    assert tuned != base


def test_stop_tokens_include_end_of_turn(peft_model):
    model, tok = peft_model
    stops = stop_token_ids(tok, model)
    assert tok.convert_tokens_to_ids("<|end|>") in stops
    assert tok.eos_token_id in stops


def test_trim_at_stop_reports_whether_the_answer_ended():
    assert trim_at_stop([7, 8, 5, 1, 1], [0, 5]) == ([7, 8], True)
    assert trim_at_stop([7, 8, 9], [0, 5]) == ([7, 8, 9], False)


def test_stopped_flags_and_token_counts(peft_model):
    model, tok = peft_model
    out = generate(model, tok, prompts(), EvalConfig(max_new_tokens=12, batch_size=4))
    for stopped, n in zip(out.stopped, out.new_tokens):
        assert n <= 12 and (stopped or n == 12)


def test_sampling_is_seeded(peft_model):
    model, tok = peft_model
    cfg = EvalConfig(max_new_tokens=8, batch_size=4, do_sample=True, temperature=1.5, seed=7)
    assert generate(model, tok, prompts(4), cfg).answers == generate(model, tok, prompts(4), cfg).answers


def test_ask_uses_the_run_config(tiny_run):
    tuned = ask("Mog's Kittens", tiny_run.run_dir, max_new_tokens=6)
    base = ask("Mog's Kittens", tiny_run.run_dir, base=True, max_new_tokens=6)
    assert isinstance(tuned, str) and isinstance(base, str) and tuned != base


def test_ask_without_adapter_is_a_user_error(tiny_run, tmp_path):
    from prodtune.config import save_config
    from prodtune.errors import UserError

    save_config(tiny_run, RunPaths(tmp_path).config)
    with pytest.raises(UserError, match="adapter"):
        ask("Mog's Kittens", tmp_path)


def test_ask_through_the_cli(tiny_run, capsys):
    """The CLI prints the answer; a folder that is not a run is a one-line error (exit 1)."""
    from prodtune.cli import main

    assert main(["ask", "Mog's Kittens", "--run", str(tiny_run.run_dir), "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["ask", "Mog's Kittens", "--run", str(tiny_run.run_dir / "nope")]) == 1


def test_ask_both_loads_once_and_matches_ask(tiny_run, monkeypatch):
    """Base and tuned from one loaded model (adapter off, then on) give what two asks give."""
    from prodtune import generate as gen

    expected = {"base": ask("Mog's Kittens", tiny_run.run_dir, base=True, max_new_tokens=6),
                "tuned": ask("Mog's Kittens", tiny_run.run_dir, max_new_tokens=6)}
    loads = []
    real = gen.load_model
    monkeypatch.setattr(gen, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert ask_both("Mog's Kittens", tiny_run.run_dir, max_new_tokens=6) == expected
    assert len(loads) == 1


@pytest.mark.parametrize("question", ["", "   \n"])
def test_ask_refuses_an_empty_question(tiny_run, question):
    from prodtune.errors import UserError

    with pytest.raises(UserError, match="empty"):
        ask(question, tiny_run.run_dir)


def test_ask_refuses_a_question_past_the_context(tiny_run):
    """The tiny model's context is 512 positions: a long question is refused, saying so."""
    from prodtune.errors import UserError

    with pytest.raises(UserError, match="context of 512 tokens: refused"):
        ask("blue " * 2000, tiny_run.run_dir, max_new_tokens=4)
