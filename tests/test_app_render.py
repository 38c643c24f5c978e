"""What the app's pure renderers (``app.ui_render``) show: the pre-fill's progress line and an answer's passages."""

from __future__ import annotations

import re

import torch

from app.ui_render import document_summary, passages_markdown, progress_html
from duo_qserve.eta import PrefillClock
from duo_qserve.evidence import describe, top_passages


def test_the_time_left_is_no_figure_until_a_tenth_of_the_document_is_done():
    """A 4.7K-token book's first chunk: the clock has one chunk, and its figure could be far off, so none is
    shown; from ``SHOW_FROM`` done on, the clock's figure is."""
    total = 4700
    early = progress_html(int(PrefillClock.SHOW_FROM * total) - 1, total, 5.0, left=95.0)
    assert "estimating… left" in early and "1 min 35 s" not in early
    shown = progress_html(int(PrefillClock.SHOW_FROM * total) + 1, total, 5.0, left=95.0)
    assert "1 min 35 s left" in shown and "estimating" not in shown


def test_passages_are_labelled_with_what_ranks_them_so_the_figures_fall_down_the_list():
    """Three windows: the first holds thin attention over many tokens (the most mass), the other two a few sharp
    looks (the most focus). The list is ranked by focus and shows focus, each a share of the book's; the export's
    ``describe`` keeps that order and both figures."""
    mass = torch.zeros(1024)
    mass[0:256] = 0.5 / 256  # thin: half the attention, little focus
    mass[600] = 0.3  # sharp
    mass[900] = 0.2
    focus = mass.square() * 4  # focus is the sum of squared probabilities (scaled: rows are summed)
    passages = top_passages(mass, focus, first=0, k=3, width=256)
    assert [p["focus"] for p in passages] == sorted((p["focus"] for p in passages), reverse=True)
    assert passages[0]["share"] < passages[-1]["share"]  # ranked by mass the list would run the other way
    shown = describe(passages, 0, tokenizer=None)
    assert [s["focus"] for s in shown] == [p["focus"] for p in passages] and "share" in shown[0]
    text = passages_markdown(shown)
    figures = [int(f) for f in re.findall(r"· (\d+)% focus", text)]
    assert len(figures) == 3 and figures == sorted(figures, reverse=True), text
    assert "ranked by *focus*" in text


def test_a_too_large_document_warns_of_the_accuracy_cost_only_past_half_streaming_heads():
    """The README's needle test loses nothing at 50% streaming heads and much at 75%: a summary that proposes a
    ratio past 50% says so (with the README's figures); one at 50% does not; without a reload it offers no button."""
    high = document_summary("book", ["book.txt"], 40_000, 9_000, 6_000, 0.75)
    assert "miss more" in high and "0.61" in high and "press the button below" in high
    assert "miss more" not in document_summary("book", ["book.txt"], 40_000, 7_000, 6_000, 0.5)
    plain = document_summary("book", ["book.txt"], 40_000, 9_000, 6_000, 0.75, can_reload=False)
    assert "button" not in plain and "ask the operator" in plain and "--sparsity 0.75" in plain


def test_the_summary_escapes_the_file_names_as_it_does_the_title():
    """Uploads are called by the names the browser sent (``app.main._uploads``), which may hold markup."""
    text = document_summary("<b>x", ["<img src=x onerror=alert(1)>.txt"], 100, 30, 1000, None)
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;.txt" in text and "<b>" not in text
