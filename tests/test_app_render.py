"""What the app's pure renderers (``app.ui_render``) show: the pre-fill's progress line and an answer's passages."""

from __future__ import annotations

from app.ui_render import progress_html
from duo_qserve.eta import PrefillClock


def test_the_time_left_is_no_figure_until_a_tenth_of_the_document_is_done():
    """A 4.7K-token book's first chunk: the clock has one chunk, and its figure could be far off, so none is
    shown; from ``SHOW_FROM`` done on, the clock's figure is."""
    total = 4700
    early = progress_html(int(PrefillClock.SHOW_FROM * total) - 1, total, 5.0, left=95.0)
    assert "estimating… left" in early and "1 min 35 s" not in early
    shown = progress_html(int(PrefillClock.SHOW_FROM * total) + 1, total, 5.0, left=95.0)
    assert "1 min 35 s left" in shown and "estimating" not in shown
