"""An Ollama Modelfile for the exported GGUF: its chat template in Ollama's Go-template language, the
run's system prompt, the end-of-turn stops and the decoding the run was evaluated with.

The TEMPLATE is derived from the tokenizer's own (Jinja) chat template, not from a table of known
formats: we render probe conversations whose contents are unique markers, read off the text each
template puts before the first message of each role, between messages, and after the last one,
and write those pieces into a Go template. The pieces are then checked against the Jinja template
on conversations with real text; a template that depends on more than the roles (dates, tool
calls, a turn counter) cannot be written this way and is refused with a message.

Ollama's chat templates see `.Messages` (role, content); with a SYSTEM line, Ollama puts the system
message first when a request brings none, which is how prodtune's prompts begin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prodtune import models
from prodtune.config import Config, EvalConfig
from prodtune.errors import UserError
from prodtune.generate import stop_token_ids
from prodtune.io import RunPaths, atomic_write_text

# Probe conversations: (roles in order). Enough to see each role first, after each other role, and last.
PROBES = [("system", "user"), ("system", "user", "assistant", "user"), ("user",), ("user", "assistant", "user"),
          ("assistant", "user"), ("user", "assistant", "system", "user")]


def _marker(i: int) -> str:
    return f"PRODTUNEMARKER{i}X"


def _render(tokenizer: Any, roles: tuple[str, ...]) -> str:
    messages = [{"role": r, "content": _marker(i)} for i, r in enumerate(roles)]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _segments(text: str, n: int) -> list[str] | None:
    """The n + 1 pieces of text around markers 0..n-1, or None when a marker is missing or repeated."""
    pieces, rest = [], text
    for i in range(n):
        if rest.count(_marker(i)) != 1:
            return None
        before, rest = rest.split(_marker(i))
        pieces.append(before)
    return pieces + [rest]


def derive_turns(tokenizer: Any) -> dict[str, dict[str, str]]:
    """The chat template as pieces: {'first': {role: text before a first message}, 'between': {role:
    text before a later message}, 'end': {role: text after the last message, generation prompt included}}."""
    turns: dict[str, dict[str, str]] = {"first": {}, "between": {}, "end": {}}

    def put(kind: str, role: str, text: str) -> None:
        seen = turns[kind].setdefault(role, text)
        if seen != text:
            raise UserError(f"the chat template puts different text before a {role} message depending on what "
                            f"came before ({seen!r} vs {text!r}); an Ollama TEMPLATE cannot be derived from it: "
                            "drop modelfile from export.formats")

    for roles in PROBES:
        try:
            pieces = _segments(_render(tokenizer, roles), len(roles))
        except Exception:  # a template may refuse a role or an order (raise_exception): skip that probe
            continue
        if pieces is None:
            continue
        put("first", roles[0], pieces[0])
        for k in range(1, len(roles)):
            put("between", roles[k], pieces[k])
        put("end", roles[-1], pieces[-1])
    if "system" not in turns["first"] or "user" not in turns["between"] or "assistant" not in turns["between"]:
        raise UserError("the chat template does not render a system message followed by user and assistant turns "
                        "the way Ollama's Messages do; drop modelfile from export.formats")
    return turns


def render_turns(turns: dict[str, dict[str, str]], messages: list[dict[str, str]]) -> str:
    """What the derived template gives for a conversation ending in a user turn (the Go template's meaning)."""
    out = []
    for i, m in enumerate(messages):
        out.append(turns["first" if i == 0 else "between"].get(m["role"], ""))
        out.append(m["content"])
    if messages and messages[-1]["role"] != "assistant":
        out.append(turns["end"].get(messages[-1]["role"], ""))
    return "".join(out)


def check_turns(tokenizer: Any, turns: dict[str, dict[str, str]]) -> None:
    """The derived pieces give the Jinja template's text on conversations with real content."""
    samples = [
        [{"role": "system", "content": "You describe products."}, {"role": "user", "content": "Describe 'Mog's Kittens'."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a garden hose?"},
         {"role": "assistant", "content": "A flexible tube.\nIt carries water."}, {"role": "user", "content": "And {{ this }}?"}],
    ]
    for messages in samples:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if render_turns(turns, messages) != expected:
            raise UserError("the chat template renders content-dependent text that an Ollama TEMPLATE cannot "
                            "reproduce; drop modelfile from export.formats")


def _go(text: str) -> str:
    """A Go template action printing `text` exactly (a quoted string constant: no whitespace trimming,
    no '{{' surprises)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _branches(pieces: dict[str, str]) -> list[str]:
    lines = []
    for k, (role, text) in enumerate(pieces.items()):
        keyword = "if" if k == 0 else "else if"
        lines.append(f'{{{{- {keyword} eq $m.Role "{role}" }}}}{_go(text) if text else ""}')
    return lines + ["{{- end }}"]


def go_template(turns: dict[str, dict[str, str]]) -> str:
    """The Ollama TEMPLATE text for the derived pieces (Go text/template over .Messages)."""
    lines = ["{{- range $i, $m := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
             "{{- if eq $i 0 }}", *_branches(turns["first"]),
             "{{- else }}", *_branches(turns["between"]),
             "{{- end }}", "{{- $m.Content }}",
             "{{- if and $last (ne $m.Role \"assistant\") }}", *_branches(turns["end"]),
             "{{- end }}", "{{- end }}"]
    return "\n".join(lines)


def default_system_prompt(turns: dict[str, dict[str, str]]) -> str | None:
    """The system prompt a template adds when a conversation starts without one (SmolLM2's does), if any."""
    first_user = turns["first"].get("user", "")
    opening = turns["first"]["system"]
    if first_user.startswith(opening) and len(first_user) > len(opening):
        rest = first_user[len(opening):]
        between = turns["between"]["user"]
        if rest.endswith(between):
            return rest[: len(rest) - len(between)]
    return None


def strip_bos(tokenizer: Any, turns: dict[str, dict[str, str]]) -> str:
    """Drop a BOS the template writes as text when the tokenizer adds it anyway (llama.cpp does too, from
    the GGUF's add_bos_token): Ollama would otherwise start every prompt with two. Returns what was dropped."""
    bos = tokenizer.bos_token or ""
    ids = tokenizer("a")["input_ids"]
    adds_bos = bool(bos) and bool(ids) and ids[0] == tokenizer.bos_token_id
    if adds_bos and all(text.startswith(bos) for text in turns["first"].values()):
        turns["first"] = {role: text[len(bos):] for role, text in turns["first"].items()}
        return bos
    return ""


def decoding_lines(e: EvalConfig) -> list[str]:
    """PARAMETER lines for the decoding the run was evaluated with, and comments for what Ollama lacks."""
    lines = [f"PARAMETER temperature {e.temperature}", f"PARAMETER top_p {e.top_p}", f"PARAMETER seed {e.seed}"] \
        if e.do_sample else ["PARAMETER temperature 0"]
    lines.append(f"PARAMETER num_predict {e.max_new_tokens}")
    if e.repetition_penalty != 1.0:
        lines.append("# Ollama penalizes the last 64 tokens, prompt included; the evaluation penalized the answer's own.")
        lines.append(f"PARAMETER repeat_penalty {e.repetition_penalty}")
    missing = []
    if e.min_new_tokens:
        missing.append(f"eval.min_new_tokens={e.min_new_tokens} (no end of turn before that many tokens)")
    if e.no_repeat_ngram_size:
        missing.append(f"eval.no_repeat_ngram_size={e.no_repeat_ngram_size} (no repeated n-gram within an answer)")
    if missing:
        lines.append(f"# Evaluated also with {'; '.join(missing)}: Ollama has no such setting, so answers can differ.")
    return lines


def modelfile_text(tokenizer: Any, gguf_name: str, system_prompt: str, eval_cfg: EvalConfig, stops: list[str],
                   title: str) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE, SYSTEM, stops and decoding."""
    turns = derive_turns(tokenizer)
    check_turns(tokenizer, turns)
    system = system_prompt or default_system_prompt(turns) or ""
    bos = strip_bos(tokenizer, turns)
    if '"""' in system:
        raise UserError('data.system_prompt contains """, which an Ollama Modelfile cannot quote; rephrase it')
    lines = [f"# Ollama Modelfile: {title}", "#   ollama create <name> -f Modelfile && ollama run <name>",
             f"FROM ./{gguf_name}", ""]
    if bos:
        lines.append(f"# The chat template starts with {bos}, which llama.cpp adds itself: left out below.")
    lines += [f'TEMPLATE """{go_template(turns)}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += ["# The decoding the model was evaluated with (eval.* in config.yaml):", *decoding_lines(eval_cfg)]
    return "\n".join(lines) + "\n"


def write_modelfile(cfg: Config, paths: RunPaths, out: Path, gguf_name: str) -> Path:
    """export/Modelfile for the run's tokenizer (the training one, saved with the adapter)."""
    tokenizer = models.load_tokenizer(cfg.model, path=str(paths.adapter))
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    title = f"{cfg.run_name}, {cfg.model.name_or_path} tuned with LoRA by prodtune ({gguf_name})"
    atomic_write_text(out, modelfile_text(tokenizer, gguf_name, cfg.data.system_prompt, cfg.eval, stops, title))
    return out
