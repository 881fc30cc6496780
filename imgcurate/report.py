"""Kept for callers of earlier versions: the reports now live in :mod:`imgcurate.reports`."""

from __future__ import annotations

from imgcurate.reports import duplicate_groups, score_histograms

__all__ = ["duplicate_groups", "score_histograms"]
