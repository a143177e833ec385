"""Shared helpers: the excerpt that reports, the clean stage and the notebooks show of long text."""

from __future__ import annotations

from prodtune.io import EXCERPT_CHARS, excerpt


def test_excerpt_cuts_with_an_ellipsis_within_the_limit():
    assert excerpt("short") == "short"
    long = "x" * 1000
    assert excerpt(long) == "x" * (EXCERPT_CHARS - 1) + "…" and len(excerpt(long)) == EXCERPT_CHARS
    assert excerpt("abcdef", 6) == "abcdef" and excerpt("abcdefg", 6) == "abcde…"
    assert excerpt(long, None) == long  # no limit


def test_excerpt_takes_any_value_and_can_fold_lines():
    assert excerpt(None) == "" and excerpt(12.5) == "12.5"
    text = "A line\n\n  and\tanother   "
    assert excerpt(text, 100) == text  # kept as it is unless asked
    assert excerpt(text, 100, one_line=True) == "A line and another"
    assert excerpt(text, 10, one_line=True) == "A line an…"


def test_atomic_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    import os

    import pytest

    from prodtune.io import atomic_dir

    target = tmp_path / "export"
    target.mkdir()
    (target / "model.gguf").write_text("finished")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's move into place
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "model.gguf").write_text("new")
    assert (target / "model.gguf").read_text() == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
