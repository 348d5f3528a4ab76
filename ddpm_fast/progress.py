"""Progress bars: one tqdm bar on stderr, built in one place for sampling, generation, training, merging and
feature extraction. tqdm is imported when the first bar is shown, so a quiet run never loads it."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total, desc: str, unit: str, *, enabled: bool = True, **options):
    """tqdm(total=total, desc=desc, unit=unit, **options), or None when not `enabled`."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, **options)
