"""Chat rows: conversations in the OpenAI / TRL `messages` format or ShareGPT's `conversations`.

    messages, why = parse_conversation(row["conversations"])  # [{"role": "user", "content": ...}, ...]
    prompt, completion = split_conversation(messages)          # ..., [the assistant's last turn]

Each message becomes {"role", "content"} with the role one of system, user or assistant (ShareGPT's
`from: human / gpt` are read as user / assistant). The assistant's last turn is what the model
learns to write and what a comparison scores; every message before it is the prompt, so earlier
assistant turns are context, never trained on. Pure functions: the readers parse with them (chunks.add_conversation), clean
cleans the messages, prompts formats them.
"""

from __future__ import annotations

import json
from typing import Any

CHAT_FIELDS = ("messages", "conversations")
"""Columns recognised as conversations when data.chat_field is not set."""
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "chatgpt": "assistant", "bot": "assistant"}
"""Roles as written by OpenAI / TRL / ShareGPT datasets -> the chat template's roles."""
TITLE_CHARS = 100
"""A chat row's 'title' in the splits and the comparison: the first user message cut to this."""


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, for messages ("a number", "null", ...)."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of parts ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def parse_conversation(value: Any) -> tuple[list[dict[str, str]] | None, str]:
    """The conversation's messages with their roles normalised, or None and why it cannot be used."""
    if isinstance(value, str):  # a CSV cell holding the conversation as JSON
        try:
            value = json.loads(value)
        except ValueError:
            return None, "is text, not a list of messages (nor JSON of one)"
    if not isinstance(value, list):
        return None, f"is {json_kind(value)}, not a list of messages"
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return None, f"message {i} is {json_kind(message)}, not an object with role and content"
        role = message.get("role", message.get("from"))
        known = ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if known is None:
            return None, (f"message {i} has role {role!r}; known roles: {', '.join(ROLES)} "
                          "(tool and function calls are not supported)")
        content = message["content"] if "content" in message else message.get("value")
        text = _text(content)
        if text is None:
            return None, f"message {i} ({known}) has {json_kind(content)} content, not text"
        messages.append({"role": known, "content": text})
    return messages, ""


def last_answer(messages: list[dict[str, str]]) -> int | None:
    """Index of the assistant's last turn (None when the assistant never speaks)."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


def first_question(messages: list[dict[str, str]]) -> str:
    """The first user message: what the conversation is about, and its split key."""
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def split_conversation(messages: list[dict[str, str]],
                       system_prompt: str = "") -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, completion): the messages before the assistant's last turn, and that turn.

    A conversation without its own system message gets system_prompt (when not empty), as product
    rows do, so that `prodtune ask` prompts like training. Turns after the last answer are dropped.
    """
    k = last_answer(messages)
    if k is None:
        raise ValueError("a conversation without an assistant turn has no completion")
    prompt = [dict(m) for m in messages[:k]]
    if system_prompt and not any(m["role"] == "system" for m in prompt):
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return prompt, [dict(messages[k])]
