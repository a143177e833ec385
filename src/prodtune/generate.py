"""Answers from the base and the tuned model: batched, left-padded, greedy by default.

One model lives in memory: the base with the LoRA adapter attached by PEFT. The base answers
inside `with model.disable_adapter():`, the tuned model with the adapter on, so comparing the two
costs one load, not two.

    model, tok = load_model(cfg.model, paths.adapter)
    with model.disable_adapter():
        base = generate(model, tok, prompts, cfg.eval, desc="base")
    tuned = generate(model, tok, prompts, cfg.eval, desc="tuned")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prodtune.config import Config, EvalConfig, ModelConfig, load_run_config
from prodtune.errors import UserError
from prodtune.io import RunPaths

# Tokens that end an assistant turn in common chat templates. generation_config.eos_token_id
# often lists only <|endoftext|>; without these a chat model talks past the end of its turn.
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Generated:
    """What came back for each prompt, in the prompts' order."""

    answers: list[str]
    """The decoded answer, up to (not including) the end-of-turn token."""
    stopped: list[bool]
    """True when the answer ended on an end-of-turn token, False when it hit max_new_tokens."""
    new_tokens: list[int]
    """Generated tokens per answer (end-of-turn token included)."""


# ----------------------------------------------------------------------------- loading

def load_model(model_cfg: ModelConfig, adapter: str | Path | None) -> tuple[Any, Any]:
    """The base model (4-bit when configured) with the adapter attached, and its tokenizer.

    The tokenizer comes from the adapter folder when training saved one there (it carries the
    chat template training used); otherwise from the base model.
    """
    from prodtune import models

    path = models.local_model_path(model_cfg)
    tok_path = path
    if adapter is not None:
        adapter = models.require_adapter(adapter)
        if (adapter / "tokenizer_config.json").is_file():
            tok_path = str(adapter)
    model = models.load_model(model_cfg, "auto", adapter=adapter, path=path)
    return model, models.load_tokenizer(model_cfg, tok_path)


def adapter_off(model: Any) -> contextlib.AbstractContextManager:
    """Context in which a PEFT model answers as its base; a plain model is its own base."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


# ----------------------------------------------------------------------------- prompts and stops

def encode_prompts(tokenizer: Any, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Chat-template token ids ending with the assistant header, exactly as training tokenizes them."""
    return [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for p in prompts]


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """eos ids of the model's generation config and tokenizer, plus any end-of-turn token it knows."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(int(i) for i in ids))


# ----------------------------------------------------------------------------- generation

def _answer_repetition_penalty(start: int, penalty: float) -> Any:
    """transformers' repetition penalty applied to the answer's own tokens only.

    The stock processor also penalizes every prompt token, and with left padding the pad token
    too, so a padded row would decode differently from the same prompt alone; and penalizing the
    prompt discourages naming the product, which a good description does.
    """
    import torch
    from transformers import LogitsProcessor

    class AnswerRepetitionPenalty(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            answer = input_ids[:, start:]  # (batch, tokens generated so far)
            if answer.shape[1] == 0:
                return scores
            picked = scores.gather(1, answer)
            picked = torch.where(picked < 0, picked * penalty, picked / penalty)
            return scores.scatter(1, answer, picked)

    return AnswerRepetitionPenalty()


def _answer_no_repeat_ngram(start: int, size: int) -> Any:
    """Forbid a token that would repeat an n-gram of the answer's own tokens (greedy loops).

    Like transformers' no_repeat_ngram_size, but blind to the prompt and the left padding, so a
    padded row decodes as the same prompt alone does.
    """
    import torch
    from transformers import LogitsProcessor

    class AnswerNoRepeatNGram(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            answer = input_ids[:, start:].tolist()
            for row, ids in enumerate(answer):
                if len(ids) < size:
                    continue
                tail = ids[len(ids) - size + 1:]
                banned = {ids[k + size - 1] for k in range(len(ids) - size + 1) if ids[k:k + size - 1] == tail}
                if banned:
                    scores[row, list(banned)] = -float("inf")
            return scores

    return AnswerNoRepeatNGram()


def generate_ids(model: Any, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: list[int],
                 batch_size: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 repetition_penalty: float = 1.0, min_new_tokens: int = 0,
                 no_repeat_ngram_size: int = 0, desc: str = "generate") -> list[list[int]]:
    """New token ids for each prompt (order kept), generated in left-padded batches.

    Prompts are sorted by length so each batch pads little; the longest batch goes first so an
    out-of-memory error shows up at once rather than at the end.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    if do_sample:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[list[int]] = [[] for _ in prompt_ids]
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                                      do_sample=do_sample, pad_token_id=pad_id,
                                      eos_token_id=stop_ids or None)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:  # silence warnings about sampling settings a model's generation_config may carry
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompt_ids[i]) for i in idx)
            # Left padding: every prompt ends at the same position, so the new tokens line up.
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            processors = ([_answer_repetition_penalty(width, repetition_penalty)]
                          if repetition_penalty != 1.0 else [])
            if no_repeat_ngram_size > 0:
                processors.append(_answer_no_repeat_ngram(width, no_repeat_ngram_size))
            seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                  logits_processor=LogitsProcessorList(processors), **gen_kwargs)
            for row, i in enumerate(idx):
                out[i] = seqs[row, width:].tolist()
            bar.update(len(idx))
    return out


def describe_decoding(e: EvalConfig) -> str:
    """Every generation setting that shapes the answers, for the report."""
    text = (f"sampling (temperature {e.temperature}, top_p {e.top_p}, seed {e.seed})" if e.do_sample
            else "greedy")
    text += f", {e.max_new_tokens} new tokens at most"
    if e.min_new_tokens:
        text += f", no end before {e.min_new_tokens}"
    if e.repetition_penalty != 1.0:
        text += f", repetition penalty {e.repetition_penalty} on answer tokens"
    if e.no_repeat_ngram_size:
        text += f", no repeated {e.no_repeat_ngram_size}-grams within an answer"
    return text


def trim_at_stop(ids: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The answer's tokens before the first stop token, and whether a stop token came."""
    stops = set(stop_ids)
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k], True
    return ids, False


def generate(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], eval_cfg: EvalConfig,
             desc: str = "generate") -> Generated:
    """Answers to chat prompts (lists of messages) with whether each ended on end-of-turn."""
    if eval_cfg.repetition_penalty <= 0:
        raise UserError(f"eval.repetition_penalty={eval_cfg.repetition_penalty}: must be > 0 (1.0 = off)")
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    new = generate_ids(model, encode_prompts(tokenizer, prompts), pad_id=pad_id, stop_ids=stops,
                       batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens,
                       do_sample=eval_cfg.do_sample, temperature=eval_cfg.temperature,
                       top_p=eval_cfg.top_p, seed=eval_cfg.seed,
                       repetition_penalty=eval_cfg.repetition_penalty, min_new_tokens=eval_cfg.min_new_tokens,
                       no_repeat_ngram_size=eval_cfg.no_repeat_ngram_size, desc=desc)
    answers, stopped, counts = [], [], []
    for ids in new:
        # Finished rows are padded with pad_id after their stop token; trimming at the stop drops it.
        kept, ended = trim_at_stop(ids, stops)
        answers.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
        stopped.append(ended)
        counts.append(len(kept) + int(ended))
    return Generated(answers, stopped, counts)


# ----------------------------------------------------------------------------- ask

def load_run(run_dir: str | Path, adapter: bool = True) -> tuple[Config, Any, Any]:
    """A finished run's config, its base model (with the trained adapter unless adapter=False)
    and tokenizer, for asking questions by hand."""
    cfg = load_run_config(run_dir)
    model, tokenizer = load_model(cfg.model, RunPaths(run_dir).adapter if adapter else None)
    return cfg, model, tokenizer


def _check_question(question: str) -> None:
    if not question.strip():
        raise UserError("the question is empty: ask about a product, e.g. "
                        "prodtune ask \"Mog's Kittens\" --run outputs/demo")


def answer(model: Any, tokenizer: Any, cfg: Config, question: str, max_new_tokens: int | None = None,
           desc: str = "answer", context: dict[str, str] | None = None, run_dir: str | Path | None = None) -> str:
    """One answer to a question (or a bare product title) with the run's prompt and decoding; the
    prompt is built as training built it (prompts.ask_prompt), from the run in run_dir."""
    from dataclasses import replace

    from prodtune.prompts import ask_prompt

    _check_question(question)
    eval_cfg = replace(cfg.eval, batch_size=1)
    if max_new_tokens is not None:
        eval_cfg.max_new_tokens = max_new_tokens
    prompt = ask_prompt(question, cfg.data, RunPaths(run_dir if run_dir is not None else cfg.run_dir).clean_parquet,
                        context)
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window:
        tokens = len(encode_prompts(tokenizer, [prompt])[0])
        if tokens + eval_cfg.max_new_tokens > window:
            raise UserError(f"the question is {tokens:,} tokens; with {eval_cfg.max_new_tokens} for the answer "
                            f"that is past the model's context of {window:,} tokens: refused, shorten it "
                            f"to at most {max(window - eval_cfg.max_new_tokens, 0):,} tokens")
    return generate(model, tokenizer, [prompt], eval_cfg, desc=desc).answers[0]


def ask(question: str, run_dir: str | Path, base: bool = False, max_new_tokens: int | None = None,
        context: dict[str, str] | None = None) -> str:
    """One answer from the tuned (or base) model of a finished run, for trying it by hand.

    `context` gives the product's context fields ({"brand": "Acme"}), shown in the prompt as
    training showed them; a run trained on conversations takes the question as the user's message.
    """
    _check_question(question)  # before loading a model for nothing
    cfg, model, tokenizer = load_run(run_dir, adapter=not base)
    return answer(model, tokenizer, cfg, question, max_new_tokens, desc="base" if base else "tuned",
                  context=context, run_dir=run_dir)


def ask_both(question: str, run_dir: str | Path, max_new_tokens: int | None = None,
             context: dict[str, str] | None = None) -> dict[str, str]:
    """The base and the tuned model's answers to one question: one model loaded, the adapter
    switched off for the base, as the comparison does."""
    _check_question(question)
    cfg, model, tokenizer = load_run(run_dir)
    with adapter_off(model):
        base = answer(model, tokenizer, cfg, question, max_new_tokens, desc="base", context=context, run_dir=run_dir)
    return {"base": base, "tuned": answer(model, tokenizer, cfg, question, max_new_tokens, desc="tuned",
                                          context=context, run_dir=run_dir)}
