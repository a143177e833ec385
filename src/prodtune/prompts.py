"""Stage 2 (format): clean rows -> TRL conversational prompt-completion JSONL splits.

`build_prompt` is the one place a prompt is built; training, comparison and `prodtune ask` all
call it, so training and inference prompts cannot diverge.
"""

from __future__ import annotations


def question_for(title: str, template: str) -> str:
    """Fill a question template's {title} placeholder."""
    return template.replace("{title}", title)


def build_prompt(question: str, system_prompt: str = "") -> list[dict[str, str]]:
    """The chat messages before the answer: an optional system message and the user question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def as_question(text: str, templates: list[str]) -> str:
    """For `prodtune ask`: a bare product title becomes a question with the first template."""
    text = text.strip()
    if text.endswith("?") or text.lower().split(" ", 1)[0] in {
            "what", "describe", "tell", "who", "how", "is", "does", "give", "write", "why", "which"}:
        return text
    return question_for(text, templates[0])
