"""Progress bars for long work (training, evaluation, tokenizing), on one process only."""

from __future__ import annotations

from typing import Any, Iterable

from tqdm import tqdm


def progress(enabled: bool, iterable: Iterable | None = None, **bar: Any):
    """A tqdm bar (over `iterable`, or to update by hand) when enabled; otherwise the iterable
    itself, or None for a hand-updated bar, so other processes print nothing."""
    if not enabled:
        return iterable
    return tqdm(iterable, **bar)
