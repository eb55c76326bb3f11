"""``tunelab train`` as the CLI runs it: the doctor first, the recipe, then the HTML report.

The doctor's findings are printed in a few lines and written to ``doctor.json`` in the run
dir (the report shows them); ``doctor.strict: true`` (or ``--strict``) refuses to train on an
error finding. The overrides given with ``--set`` go to ``overrides.json`` for the report.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ..config import Config, ConfigError
from ..files import atomic_write_json
from ..report import write_run_report
from ..train.recipe import TrainResult, train
from ..train.rundir import holds_run
from .doctor import ERROR, diagnose, summary_lines
from .samples import write_samples


class DoctorFailed(ConfigError):
    """Strict doctor and an error finding: the CLI prints this line and exits 2."""


def _is_main() -> bool:
    """Under ``accelerate launch`` every process runs the CLI: all check (the same verdict, so a
    strict refusal stops them all), the first prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def run_doctor(cfg: Config, strict: bool = False, echo: Any = print, **kw: Any) -> list:
    try:
        findings, _ = diagnose(cfg, **kw)
    except (ConfigError, OSError, ValueError) as e:  # the doctor never stops a run by failing itself
        echo(f"doctor: could not check this config ({type(e).__name__}: {e}); training continues")
        return []
    if _is_main():
        for line in summary_lines(findings):
            echo(line)
    errors = [f for f in findings if f.severity == ERROR]
    if errors and (strict or cfg.doctor.strict):
        if _is_main() and not holds_run(cfg.run_dir):  # never write into another run's folder
            atomic_write_json(cfg.run_dir / "doctor.json", [f.to_dict() for f in findings])
        raise DoctorFailed(f"doctor (strict): {len(errors)} error finding(s): " + "; ".join(f"{f.code}: {f.what}" for f in errors)
                           + " -- fix them (tunelab doctor CONFIG explains each) or set doctor.strict: false")
    return findings


def train_checked(cfg: Config, overrides: list[str] | tuple[str, ...] = (), resume: bool = False, strict: bool = False,
                  report: bool = True, console: Optional[Any] = None, **train_kw: Any) -> TrainResult:
    """Doctor, train, report: what ``tunelab train`` does."""
    findings = run_doctor(cfg, strict) if (cfg.doctor.enabled or strict) else None
    result = train(cfg, overrides, resume=resume, console=console, **train_kw)
    if _is_main():  # written once the recipe owns the run dir (it refuses, or moves aside, an old run)
        if findings is not None:
            atomic_write_json(cfg.run_dir / "doctor.json", [f.to_dict() for f in findings])
        atomic_write_json(cfg.run_dir / "overrides.json", list(overrides))
    if report and cfg.report.enabled and _is_main():
        write_samples(cfg)
        out = write_run_report(cfg.run_dir)
        print(f"report: {out}")
    return result
