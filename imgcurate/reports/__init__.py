"""Reports: the run report (one HTML page per run), the duplicate page and the score histograms.

- :func:`run_report` / :func:`report_run_dir`: counts, time per step, drops by reason with thumbnails, score
  histograms with thresholds, errors, and the duplicate groups of every dedup step (:mod:`imgcurate.reports.run`).
- :func:`duplicate_groups`: what one dedup step found, as its own page.
- :func:`score_histograms`: a PNG of score histograms and drops by reason.
"""

from __future__ import annotations

from imgcurate.reports.duplicates import duplicate_groups
from imgcurate.reports.run import REPORT_NAME, report_run_dir, run_report
from imgcurate.reports.scores import score_histograms

__all__ = ["REPORT_NAME", "duplicate_groups", "report_run_dir", "run_report", "score_histograms"]
