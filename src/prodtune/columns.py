"""Which input column holds what: the title, the description, the id, extra context, or a conversation.

    mapping = resolve_mapping(data, ["product_name", "description", "brand"], "shop.csv")
    mapping.columns  -> the columns to read;  context_text(12.5) -> "12.5"

Resolved once per input from data.title_field, content_field, id_field, context_fields and
chat_field and the input's own columns (a CSV header, a parquet schema, the keys of the first
JSON records). Keys left unset fall back to today's names: uid/title/content (trn.json),
instruction/output with `input` as context (Alpaca), or a messages / conversations column (chat).
"""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prodtune.chat import CHAT_FIELDS
from prodtune.config import DataConfig
from prodtune.errors import UserError

CLEAN_COLUMNS = ("uid", "title", "content", "messages")
"""clean.parquet's own columns; the context columns come after them, under their input names."""


@dataclass(frozen=True)
class Mapping:
    """The input's columns that hold each part of a row (a product, or a conversation)."""

    title: str | None
    """Product title (None for conversations: their title is the first user message)."""
    content: str | None
    """Product description: the answer to learn (None for conversations: their last assistant turn)."""
    uid: str | None = None
    """Row id (auto: uid, else id); None: made up from the line or row number."""
    context: tuple[str, ...] = ()
    """Extra columns rendered into the prompt as labelled lines (brand, category ...)."""
    chat: str | None = None
    """The column holding a conversation (a list of messages); None for product rows."""

    @property
    def kind(self) -> str:
        """'chat' or 'product'."""
        return "chat" if self.chat else "product"

    @property
    def columns(self) -> list[str]:
        """Every input column read, each once."""
        return list(dict.fromkeys(c for c in (self.uid, self.title, self.content, *self.context, self.chat) if c))

    def describe(self) -> dict[str, Any]:
        """The mapping as built, for the clean report."""
        return {"kind": self.kind, "title": self.title, "content": self.content, "id": self.uid,
                "context": list(self.context), "chat": self.chat}


def _shape(cols: list[str] | None) -> str:
    """The known shape the columns have: 'trn.json' (also when unknown), 'alpaca', a conversation
    column's name, or '' for none of them."""
    if cols is None or {"title", "content"} <= set(cols):
        return "trn.json"
    if {"instruction", "output"} <= set(cols):
        return "alpaca"
    return next((c for c in CHAT_FIELDS if c in cols), "")


def _auto_id(cols: list[str] | None) -> str | None:
    return next((c for c in ("uid", "id") if cols and c in cols), None)


def resolve_mapping(data: DataConfig, columns: Sequence[str] | None, source: str,
                    seen: str = "columns") -> Mapping:
    """The mapping from data.*_field and the input's columns (None: not known, taken on trust).

    Unset keys are auto-detected: title/content (trn.json), instruction/output (Alpaca, whose
    `input` becomes context), else a messages or conversations column (a chat dataset). Every
    problem is collected into one UserError that lists the columns the input has.
    """
    cols = None if columns is None else list(columns)
    has = (lambda c: True) if cols is None else (lambda c: c in cols)
    product_keys = data.title_field is not None or data.content_field is not None
    shape = "" if product_keys or data.chat_field is not None else _shape(cols)
    alpaca = shape == "alpaca"
    chat = data.chat_field or (shape if shape in CHAT_FIELDS else None)
    problems = []
    if data.chat_field is not None and product_keys:
        problems.append("data.chat_field and data.title_field/content_field are both set: a row is either a "
                        "conversation or a product; unset one")
    if chat:
        if data.context_fields:
            problems.append("data.context_fields applies to product rows; a conversation carries its context in "
                            "its messages: leave data.context_fields unset")
        mapping = Mapping(None, None, data.id_field or _auto_id(cols), (), chat)
        wanted = {"data.chat_field": chat}
    else:
        title = data.title_field or ("instruction" if alpaca else "title")
        content = data.content_field or ("output" if alpaca else "content")
        uid = data.id_field or (None if alpaca else "uid" if cols is None else _auto_id(cols))
        context = (tuple(data.context_fields) if data.context_fields is not None
                   else ("input",) if alpaca and has("input") else ())
        mapping = Mapping(title, content, uid, context)
        wanted = {"data.title_field": title, "data.content_field": content}
    if data.id_field:
        wanted["data.id_field"] = data.id_field
    wanted.update({f"data.context_fields[{i}]": c for i, c in enumerate(mapping.context)})
    hint = ""
    if cols is not None:
        for key, col in wanted.items():
            if col not in cols:
                auto = "data.title_field" in key and data.title_field is None or \
                       "data.content_field" in key and data.content_field is None
                problems.append(f"no '{col}' column" if auto else f"{key} '{col}' is not a column")
                if auto:
                    hint = ("data.title_field and data.content_field are unset, so the trn.json or Alpaca names "
                            "are looked for: set them to the columns holding the product name and its description")
    taken = {mapping.uid, mapping.title, mapping.content, mapping.chat}
    for name in mapping.context:
        if name in taken or name in CLEAN_COLUMNS:
            problems.append(f"data.context_fields: '{name}' is already the title, description, id or conversation "
                            f"column, or a name clean.parquet uses ({', '.join(CLEAN_COLUMNS)}); leave it out")
    if len(set(mapping.context)) != len(mapping.context):
        problems.append("data.context_fields lists a column twice")
    if problems and hint:
        problems.append(hint)
    if problems:
        listed = f"; its {seen}: {', '.join(cols[:60])}" + (" ..." if len(cols) > 60 else "") if cols else ""
        raise UserError(f"data.raw_path '{source}': " + "; ".join(dict.fromkeys(problems)) + listed)
    return mapping


def context_text(value: Any) -> str | None:
    """A context value as the text the prompt shows: numbers as written, lists joined with '; '."""
    if value is None:
        return None
    if value.__class__ is str:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape in JSON: shown as '?'
                value = value.encode("utf-8", "replace").decode("utf-8")
        return value or None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN: how pandas writes a missing number
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, decimal.Decimal)):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        parts = [t for t in map(context_text, value) if t]
        return "; ".join(parts) or None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)
