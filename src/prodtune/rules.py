"""The clean stage's text rules, one string or one column at a time (prodtune.clean applies them).

    unescape_entities("Kerr&amp;#8217;s")   -> "Kerr’s"
    strip_tags("<p>Great <b>toy</b></p>")    -> "Great toy"
    clean_column(titles, data, content=False) edits a column in place and says which rows changed

Each rule runs over a whole column with a C-speed test in front ('&' in s, s.isascii() ...), so the
most rows, which need no work, cost almost nothing. The same rules clean titles, descriptions,
the extra context columns and every message of a conversation.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa

from prodtune.config import DataConfig

N_EXAMPLES = 3
# ----------------------------------------------------------------------------- one string

_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|ul|ol|tr|td|th|h[1-6]|table|hr|blockquote|dd|dt)\b[^<>]*>",
                        re.IGNORECASE)
_TAG = re.compile(r"<!--.*?-->|<\s*/?\s*[A-Za-z][A-Za-z0-9]*\b[^<>]*>", re.DOTALL)
_OPEN_TAG = re.compile(r"<\s*/?\s*[A-Za-z][A-Za-z0-9]*\s[^<>]*=[^<>]*$|<!--(?!.*-->).*$", re.DOTALL)
# "--This text refers to thePaperbackedition." (the edition name lost its spaces with its <i> tag),
# "--This text refers to an out of print or unavailable edition of this title.", ...
# It starts with a literal so that re can find it with a fast substring search (a leading \s* or
# (?i) made this rule cost 60 µs a row); the "--This " in front is trimmed by remove_boilerplate.
_BOILERPLATE = re.compile(r"text refers to\s*[^.]{0,80}?edition(?: of this title)?\.?")
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_INVISIBLE = re.compile("[\u00ad\u200b\u2060\ufeff]")  # soft hyphen, zero-width space, word joiner, BOM
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NON_WORD = re.compile(r"[\W_]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
# Review blurbs: "'A wonderful book' Daily Mail 'Superb' The Times". A quoted passage opens after a
# space (or at the start) and closes before a space or punctuation, so "don't" is not a quote; the
# pattern starts with the quote character so that re skips to candidates quickly (~7 µs a row).
_QUOTED = re.compile(r"""['"\u2018\u201c](?<![^\s]['"\u2018\u201c])(.{8,}?)['"\u2019\u201d](?=[\s.,;:!?)]|$)""")
_CAPITALISED = re.compile(r"[A-Z][a-z]+")
_PUBLICATIONS = frozenset(
    "Times Guardian Observer Telegraph Daily Independent Sunday Express Mirror Magazine Weekly Kirkus Journal "
    "Booklist Review Spectator Tribune Post Herald Mail Standard Evening Scotsman Literary Chronicle Globe "
    "Gazette Newsweek Esquire Vogue Listener Bookseller Economist".split())
_QUOTE_CHARS = ("'", '"', "\u2018", "\u201c")


def unescape_entities(text: str) -> str:
    """html.unescape until nothing changes (at most 3 rounds): '&amp;#8217;' -> '&#8217;' -> '’'."""
    return _unescape(text)[0]


@functools.lru_cache(maxsize=8192)
def _charref(ref: str) -> tuple[str, bool]:
    """html.unescape of one entity, and whether normalize_text could never change what it gives:
    letters, digits, punctuation or symbols, NFKC-stable, none that composes with a neighbour."""
    text = html.unescape(ref)
    safe = unicodedata.is_normalized("NFKC", text) and all(
        unicodedata.category(ch)[0] in "LNPS" and not unicodedata.combining(ch)
        and not 0x1100 <= ord(ch) <= 0x11FF for ch in text)  # Hangul jamo compose too
    return text, safe


def _unescape(text: str) -> tuple[str, bool]:
    """unescape_entities, and whether every replacement was safe (see _charref)."""
    safe = True

    def one(m: re.Match) -> str:
        nonlocal safe
        new, ok = _charref(m.group(0))
        safe = safe and ok
        return new

    for _ in range(3):
        # html.unescape's own pattern: a reference's replacement depends on its match alone, so
        # this gives html.unescape's result, with each distinct entity looked up once (cached).
        new = _CHARREF.sub(one, text)
        if new == text or "&" not in new:
            return new, safe
        text = new
    return text, safe


def strip_tags(text: str) -> str:
    """Drop HTML tags and comments; block tags (<br>, <p>, <li> ...) become a space.

    Repeated until nothing changes, so that removing one tag cannot join its neighbours into a new
    one ('<scr<script>ipt>' would become '<script>'); a tag left open at the end of the text, with
    attributes ('<img src=x onerror=...'), goes too.
    """
    while True:
        new = _OPEN_TAG.sub("", _TAG.sub("", _BLOCK_TAG.sub(" ", text)))
        if new == text or "<" not in new:
            return new.strip()
        text = new


def remove_boilerplate(text: str) -> str:
    """Remove Amazon's '--This text refers to ... edition.' notes."""
    parts, last, at = [], 0, text.find("text refers to")
    while at >= 0:
        m = _BOILERPLATE.match(text, at)
        if m and text[max(0, at - 5):at].lower() == "this ":
            parts.append(text[last:at - 5].rstrip(" -\t\r\n"))
            last = m.end()
        at = text.find("text refers to", at + 14)
    if not parts:
        return text
    parts.append(text[last:])
    return " ".join(p for p in map(str.strip, parts) if p)


def needs_normalizing(text: str) -> bool:
    """Cheap test in front of normalize_text: non-ASCII, control characters or stray spaces."""
    return (not text.isascii() or not text.isprintable() or "  " in text
            or text[:1] == " " or text[-1:] == " ")


def normalize_text(text: str) -> str:
    """NFKC, invisible characters removed, control characters and whitespace runs -> one space."""
    if not text.isascii() and not unicodedata.is_normalized("NFKC", text):  # the check is cheap
        text = unicodedata.normalize("NFKC", text)
    if not text.isprintable():  # controls, invisible (format) characters, odd spaces
        return " ".join(_CONTROL.sub(" ", _INVISIBLE.sub("", text)).split())
    # Printable text has no whitespace but " ": replace() is several times faster than split().
    while "  " in text:
        text = text.replace("  ", " ")
    return text.strip(" ")


def is_review_blurb(text: str) -> bool:
    """True when a content is press praise rather than a description: mostly quoted passages, or a
    short text naming two or more publications ("... easy to use. The Sunday Times Superbly handy.
    The Observer"). Trained on, such rows teach a model to invent quotes and attribute them."""
    if len(text) < 700 and sum(w in _PUBLICATIONS for w in _CAPITALISED.findall(text)) >= 2:
        return True
    if not any(q in text for q in _QUOTE_CHARS):
        return False
    quoted = sum(len(m.group(1)) for m in _QUOTED.finditer(text))
    return quoted >= 0.4 * len(text)


def text_key(text: str) -> str:
    """Comparison key: casefolded, punctuation and whitespace dropped ('The Prophet.' == 'the prophet')."""
    return _NON_WORD.sub("", text.casefold())


def cap_text(text: str, max_chars: int) -> str:
    """Cut text to at most max_chars at the last sentence end, else the last space, in the second half."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    end = 0
    for m in _SENTENCE_END.finditer(head, max(0, max_chars // 2 - 8)):  # the second half only
        end = m.end()
    if end > max_chars // 2:
        return head[:end].rstrip()
    space = head.rfind(" ")
    return (head[:space] if space > max_chars // 2 else head[:max_chars]).rstrip()


Edit = tuple[int, str, str]  # (row index in the chunk, text before, text after)


def clean_column(texts: list[str], data: DataConfig, content: bool,
                 to_normalize: np.ndarray | None = None) -> dict[str, list[Edit]]:
    """Apply the enabled edit rules to a column of titles or contents, in place.

    A rule at a time over the column: a C-speed test ('&' in s, s.isascii() ...) picks the few rows
    the rule can change, and only those pay for it. Returns, per rule, the rows it changed, with the
    text just before and after for the first few. `to_normalize`, when given, lists the rows of the
    raw column that needs_normalizing (found faster in bulk by rows_to_normalize).
    """
    rules = [("entities", data.unescape_entities, "&", _unescape),
             ("html", data.strip_html, "<", strip_tags),
             ("boilerplate", content and data.remove_boilerplate, "text refers to", remove_boilerplate)]
    edits: dict[str, list[Edit]] = {}
    unsafe: set[int] = set()  # rows given a character by an entity that normalizing might change
    for rule, wanted, test, fn in rules:
        if wanted:
            found = [i for i, s in enumerate(texts) if test in s]
            edits[rule] = _edit(texts, found, fn, unsafe if rule == "entities" else None)
    if data.normalize_unicode:
        if to_normalize is None:
            rows = [i for i, s in enumerate(texts) if needs_normalizing(s)]
        else:  # the bulk scan saw the raw text: recheck rows that unsafe entities or tags changed
            touched = unsafe | {e[0] for e in edits.get("html", ())}
            rows = sorted(set(to_normalize.tolist()) | {i for i in touched if needs_normalizing(texts[i])})
        edits["unicode"] = _edit(texts, rows, normalize_text)
    else:
        _edit(texts, [i for i, s in enumerate(texts) if s[:1].isspace() or s[-1:].isspace()], str.strip)
    return edits


def rows_to_normalize(column: pa.ChunkedArray) -> np.ndarray:
    """Rows of a string column that needs_normalizing, found with numpy over the UTF-8 bytes.

    A byte outside printable ASCII, two spaces in a row, or a space at either end. About twice as
    fast as the str tests row by row, which is what most of a clean's time goes to otherwise.
    """
    found, base = [], 0
    for arr in column.chunks:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
        if arr.buffers()[2] is None or offsets[-1] == offsets[0]:
            base += len(arr)
            continue
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        b = data[offsets[0]: offsets[-1]]
        flag = (b - np.uint8(32)) > 94  # below 32 or above 126, in one pass (uint8 wraps around)
        space = b == 32
        flag[1:] |= space[1:] & space[:-1]
        at = np.flatnonzero(flag) + offsets[0]
        rows = np.searchsorted(offsets, at, side="right") - 1
        filled = np.flatnonzero(offsets[1:] > offsets[:-1])
        ends = filled[(data[offsets[filled]] == 32) | (data[offsets[filled + 1] - 1] == 32)]
        found.append(np.union1d(rows, ends) + base)
        base += len(arr)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _edit(texts: list[str], rows: list[int], fn: Any, unsafe: set[int] | None = None) -> list[Edit]:
    """Apply fn to texts[i] for i in rows; with `unsafe`, fn gives (text, safe) and unsafe rows are noted."""
    changed: list[Edit] = []
    for i in rows:
        before = texts[i]
        after = fn(before)
        if unsafe is not None:
            after, safe = after
            if not safe:
                unsafe.add(i)
        if after != before:
            texts[i] = after
            changed.append((i, before, after) if len(changed) < N_EXAMPLES else (i, "", ""))
    return changed


def clean_text(text: str, data: DataConfig, content: bool = True) -> str:
    """One title or content through the enabled edit rules (clean_chunk does them a column at a time)."""
    texts = [text]
    clean_column(texts, data, content)
    return texts[0]
