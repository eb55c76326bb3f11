"""The audit as ``tunelab train`` runs it: fast mode, a one-screen summary, and the
``data.audit`` policy (off | warn | strict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..data.formats import DataError
from .core import AuditOptions, renderer_info, run_audit
from .report import AuditReport


class AuditFailed(DataError):
    """data.audit: strict and the audit found errors. A DataError, so the CLI prints it and exits 2."""

    def __init__(self, report: AuditReport):
        codes = ", ".join(sorted(report.codes("error")))
        super().__init__("data.audit", f"strict: the data audit found {report.count('error')} error findings ({codes}); "
                                        "fix the data (tunelab audit DATA for the full report, --fix OUT for a cleaned copy) "
                                        "or set data.audit: warn")
        self.report = report


def audit_for_training(cfg: Any, renderer: Any = None, data: Any = None, rep: Any = None, *, console: Any = None,
                       fast: bool = True) -> Optional[AuditReport]:
    """Audit the training data of ``cfg`` before training and apply ``cfg.data.audit``.

    * ``cfg``: the resolved Config (``data.train``, ``data.eval``, ``data.max_seq_len``,
      ``data.train_on``, ``data.audit``).
    * ``renderer``: the run's Renderer (tokenizer + template); None counts words instead.
    * ``data``: optional ``PreparedData``; when training holds out ``data.eval_fraction`` of
      the train files, its ``eval_conversations`` (their ``source`` ids) mark those records
      as eval so that train/eval leakage is checked on the real split.
    * ``rep``: optional reporter with ``info(renderable)`` / ``warn(str)`` (the recipe's);
      else ``console`` (a rich Console); else nothing is printed.
    * ``fast``: no spot-check file and no JSON report (the rest is fast enough to run in full:
      see benchmarks/audit_speed.py); else both go to the run dir (``audit-spotcheck.html``,
      ``audit.json``).

    Returns the report (None when ``data.audit`` is off). Raises :class:`AuditFailed`
    (a DataError) when ``data.audit`` is strict and there are error findings.
    """
    mode = getattr(cfg.data, "audit", "warn")
    if mode == "off":
        return None
    opts = AuditOptions(max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation, seed=cfg.train.seed,
                        spot_check_path=None if fast else str(cfg.run_dir / "audit-spotcheck.html"))
    eval_where = None
    if data is not None and cfg.data.eval is None and getattr(data, "eval_conversations", None):
        eval_where = {c.source for c in data.eval_conversations if c.source}
    evals = [cfg.data.eval] if cfg.data.eval is not None else []
    # The audit reads files itself (every bad line reported); Hugging Face datasets and mapped
    # columns are not audited yet: say so rather than fail on them.
    plain = lambda e: bool(e.path) and not e.columns and Path(e.path).is_file()  # noqa: E731
    left_out = [e.source for e in [*cfg.data.train, *evals] if not plain(e)]
    train_files, evals = [e for e in cfg.data.train if plain(e)], [e for e in evals if plain(e)]
    if left_out and rep is not None:
        rep.warn(f"data audit skips {left_out}: Hugging Face datasets and column mappings are not audited yet")
    if not train_files:
        return None
    info = renderer_info(renderer, cfg.model.name) if renderer is not None else {"unit": "words", "note": "no renderer given"}
    report = run_audit(train_files, evals, renderer=renderer, options=opts, tokenizer_info=info, eval_where=eval_where)
    if not fast:  # the full report next to the spot check, in the run dir
        report.write_json(cfg.run_dir / "audit.json")
    summary = report.rich_summary()
    if data is not None and getattr(data, "replay", None) is not None:
        from rich.console import Group
        from rich.text import Text

        summary = Group(summary, Text(data.replay.summary()))  # data.replay: in the summary, not audited as task data
    if rep is not None:
        rep.info(summary)
    elif console is not None:
        console.print(summary)
    if report.has_errors:
        if mode == "strict":
            raise AuditFailed(report)
        if rep is not None and hasattr(rep, "warn"):
            rep.warn("the data audit found errors (data.audit: warn, so training continues; strict would stop here)")
    return report
