"""Data audit: what ``tunelab audit`` reports and ``tunelab train`` checks before training.

One module per check: ``schema`` (formats, fields, encoding), ``dedup`` (exact duplicates,
conflicting completions, exact leakage), ``neardup`` (MinHash + LSH clusters, near leakage),
``balance`` (tasks, labels), ``lengths``/``tokens`` (token lengths of the rendered template,
truncation), ``artifacts`` (special tokens, markers, placeholders, whitespace, echoes),
``spotcheck`` (the sample to read), ``report`` (JSON, rich, summary), ``fix`` (cleaned copy).

    from tunelab.audit import run_audit, AuditOptions, load_renderer
    renderer, info = load_renderer("smollm2-135m-instruct")
    report = run_audit(["train.jsonl"], ["eval.jsonl"], renderer=renderer, tokenizer_info=info)
    print(report.summary_text()); sys.exit(report.exit_code)
"""

from .core import AuditOptions, DataSource, load_renderer, run_audit
from .findings import ERROR, INFO, WARNING, Finding
from .fix import FixResult, write_fixed
from .report import SCHEMA_VERSION, AuditReport
from .training import AuditFailed, audit_for_training

__all__ = [
    "AuditFailed", "AuditOptions", "AuditReport", "DataSource", "ERROR", "Finding", "FixResult", "INFO", "SCHEMA_VERSION",
    "WARNING", "audit_for_training", "load_renderer", "run_audit", "write_fixed",
]
