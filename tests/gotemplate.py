"""A small renderer of the Go text/template subset Ollama Modelfile templates use, for the tests only:
text, {{ }} actions with {{- / -}} whitespace trimming, string/number constants, $variables and
fields ($m.Role, .Messages, $.Messages), `:=`, range over a list with `$i, $m :=`, if / else if /
else / end, and the functions eq, ne, and, not, len, slice. Enough to render the TEMPLATE prodtune
writes the way Ollama would, so a test can compare it byte for byte with the Jinja chat template.
"""

from __future__ import annotations

import json
import re
from typing import Any

ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|,|[$.\w][\w.$]*|-?\d+)')


def _lex(template: str) -> list[tuple[str, str]]:
    """[('text', ...) | ('action', ...)] with Go's trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    parts.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return parts


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            if expr[pos:].strip() == "":
                break
            raise ValueError(f"cannot parse {expr[pos:]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def _value(tok: str, scope: dict[str, Any], dot: Any) -> Any:
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    names = tok.split(".")
    if tok.startswith("$"):
        base = scope["$"] if names[0] == "$" else scope[names[0]]
        names = names[1:]
    else:  # .Field on dot
        base, names = dot, names[1:]
    for n in names:
        if n:
            base = base[n] if isinstance(base, dict) else getattr(base, n)
    return base


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(a), "not": lambda a: not a,
         "len": len, "slice": lambda xs, i: xs[i:]}


def _eval(tokens: list[str], scope: dict[str, Any], dot: Any) -> Any:
    def parse(i: int) -> tuple[Any, int]:
        """One operand at tokens[i]: a parenthesised pipeline or a value."""
        if tokens[i] == "(":
            j, depth = i + 1, 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            return _eval(tokens[i + 1:j - 1], scope, dot), j
        return _value(tokens[i], scope, dot), i + 1

    if tokens[0] in FUNCS:
        args, i = [], 1
        while i < len(tokens):
            arg, i = parse(i)
            args.append(arg)
        return FUNCS[tokens[0]](*args)
    value, _ = parse(0)
    return value


def render(template: str, data: dict[str, Any]) -> str:
    """Render `template` with `data` as dot (and $)."""
    parts = _lex(template)
    out: list[str] = []

    def block(i: int, scope: dict[str, Any], dot: Any, emit: bool) -> tuple[int, str]:
        """Run parts from i until an else/end at this level; returns (index of it, its action text)."""
        while i < len(parts):
            kind, text = parts[i]
            if kind == "text":
                if emit:
                    out.append(text)
                i += 1
                continue
            words = _tokens(text)
            head = words[0] if words else ""
            if head in ("end", "else"):
                return i, text
            if head == "if":
                i = conditional(i, scope, dot, emit)
            elif head == "range":
                i = loop(i, scope, dot, emit)
            elif len(words) > 1 and words[1] == ":=":
                if emit:
                    scope[words[0]] = _eval(words[2:], scope, dot)
                i += 1
            else:
                if emit:
                    out.append(str(_eval(words, scope, dot)))
                i += 1
        return i, ""

    def conditional(i: int, scope: dict[str, Any], dot: Any, emit: bool) -> int:
        taken = False
        condition = _tokens(parts[i][1])[1:]
        while True:
            run = emit and not taken and bool(_eval(condition, scope, dot))
            taken = taken or run
            i, stop = block(i + 1, scope, dot, run)
            words = _tokens(stop)
            if words[0] == "end":
                return i + 1
            condition = words[2:] if len(words) > 1 and words[1] == "if" else ["true"]

    def loop(i: int, scope: dict[str, Any], dot: Any, emit: bool) -> int:
        words = _tokens(parts[i][1])[1:]
        at = words.index(":=")
        names = [w for w in words[:at] if w != ","]
        items = _eval(words[at + 1:], scope, dot) if emit else []
        end = None
        for k, item in enumerate(items):
            inner = dict(scope)
            inner[names[0]] = k if len(names) == 2 else item
            if len(names) == 2:
                inner[names[1]] = item
            end, _ = block(i + 1, inner, item, True)
        if end is None:
            end, _ = block(i + 1, dict(scope), None, False)
        return end + 1

    block(0, {"$": data}, data, True)
    return "".join(out)
