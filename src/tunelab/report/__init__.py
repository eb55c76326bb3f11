"""``tunelab report RUN_OR_SWEEP``: one self-contained HTML file per run or sweep.

Reads only files in the run dir (config.yaml, overrides.json, doctor.json, audit_summary.json,
metrics.jsonl, eval tables, samples.json) or the sweep dir (sweep.jsonl); plotly's JavaScript
is inlined, so the page makes no network request.
"""

from .html import build_report, write_report, write_run_report

__all__ = ["build_report", "write_report", "write_run_report"]
