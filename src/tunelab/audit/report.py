"""The audit report: findings plus the measured sections, as JSON (schema in docs/audit.md),
rich tables (``tunelab audit``) or a one-screen summary (``tunelab train``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..files import atomic_write_text
from .findings import ERROR, INFO, WARNING, Finding, sort_findings
from .reader import AuditRecord, FileInfo

SCHEMA_VERSION = 1
_STYLE = {ERROR: "bold red", WARNING: "yellow", INFO: "cyan"}


@dataclass(eq=False)
class AuditReport:
    settings: dict
    tokenizer: dict
    files: list[FileInfo]
    findings: list[Finding]
    sections: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # What --fix needs (not serialized): the records and each check's raw result.
    records: list[AuditRecord] = field(default_factory=list, repr=False)
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.findings = sort_findings(self.findings)

    # -- verdict -----------------------------------------------------------------------
    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def has_errors(self) -> bool:
        return self.count(ERROR) > 0

    @property
    def exit_code(self) -> int:
        """1 when a finding of error severity exists (CI gate), else 0."""
        return 1 if self.has_errors else 0

    def codes(self, severity: Optional[str] = None) -> set[str]:
        return {f.code for f in self.findings if severity is None or f.severity == severity}

    def finding(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    @property
    def summary(self) -> dict:
        recs = self.records
        return {
            "files": len(self.files),
            "records": len(recs),
            "train_records": sum(1 for r in recs if r.split == "train"),
            "eval_records": sum(1 for r in recs if r.split == "eval"),
            "converted": sum(1 for r in recs if r.conv is not None),
            "errors": self.count(ERROR),
            "warnings": self.count(WARNING),
            "infos": self.count(INFO),
            "passed": not self.has_errors,
            "exit_code": self.exit_code,
        }

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "tunelab audit",
            "summary": self.summary,
            "settings": self.settings,
            "tokenizer": self.tokenizer,
            "files": [f.to_dict() for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
            **self.sections,
            "timings": self.timings,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(_clean(self.to_dict()), indent=indent, ensure_ascii=False, allow_nan=False)

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    def grouped(self) -> list[tuple[Finding, int, int]]:
        """(first finding, number of findings, total count) per code, in report order:
        ten single-label tasks make one line of a summary, not ten."""
        out: dict[str, list] = {}
        for f in self.findings:
            if f.code in out:
                out[f.code][1] += 1
                out[f.code][2] += f.count
            else:
                out[f.code] = [f, 1, f.count]
        return [tuple(v) for v in out.values()]

    @staticmethod
    def _one_line(f: Finding, n: int) -> str:
        msg = f.message if n == 1 else f"{n}x, e.g. {f.message}"
        return " ".join(msg.split())

    # -- text ----------------------------------------------------------------------------
    def _headline(self) -> str:
        s = self.summary
        bad = s["records"] - s["converted"]
        return (f"data audit: {s['records']} records in {s['files']} files ({s['train_records']} train, {s['eval_records']} eval)"
                + (f", {bad} not loadable" if bad else ""))

    def _lengths_line(self) -> Optional[str]:
        L = self.sections.get("lengths")
        if not L or not L.get("total"):
            return None
        t = L["total"]
        line = f"lengths ({L['unit']}): total p50 {t['p50']}, p95 {t['p95']}, max {t['max']}"
        if L.get("max_seq_len"):
            line += f"; {L['over_max_seq_len']} over max_seq_len={L['max_seq_len']}" + (" " + _over_words(L) if L["over_max_seq_len"] else "")
        return line

    def _dups_line(self) -> str:
        d = self.sections.get("duplicates", {})
        nd = self.sections.get("near_duplicates", {})
        lk = self.sections.get("leakage", {})
        return (f"duplicates: {d.get('exact_redundant', 0)} exact, {nd.get('redundant', 0)} near "
                f"({nd.get('clusters_total', 0)} clusters); train/eval leakage: {lk.get('eval_records_leaked', 0)}")

    def _verdict(self) -> str:
        e, w, i = self.count(ERROR), self.count(WARNING), self.count(INFO)
        if e:
            return f"FAIL: {e} error, {w} warning, {i} info findings (exit code 1)"
        return f"PASS: no errors; {w} warning, {i} info findings"

    def summary_text(self, max_findings: int = 12, width: int = 110) -> str:
        """A one-screen plain-text summary (what ``tunelab train`` prints before training)."""
        lines = [self._headline()]
        if (ll := self._lengths_line()) is not None:
            lines.append(ll)
        lines.append(self._dups_line())
        groups = self.grouped()
        for f, n, total in groups[:max_findings]:
            line = f"  {f.severity.upper():7} {f.code} ({total}): {self._one_line(f, n)}"
            lines.append(line if len(line) <= width else line[: width - 1] + "…")
        if len(groups) > max_findings:
            lines.append(f"  ... and {len(groups) - max_findings} more kinds of findings (tunelab audit for the full report)")
        lines.append(self._verdict())
        return "\n".join(lines)

    # -- rich ----------------------------------------------------------------------------
    def rich_summary(self) -> Any:
        """One screen, for training: headline, lengths, duplicates, the top findings, verdict."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        # One line per kind of finding: the message column takes what the others leave.
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False, expand=True)
        t.add_column("severity", no_wrap=True)
        t.add_column("finding", no_wrap=True, max_width=26, overflow="ellipsis")
        t.add_column("count", justify="right", no_wrap=True)
        t.add_column("what (tunelab audit for the full report)", no_wrap=True, overflow="ellipsis", ratio=1, min_width=10)
        groups = self.grouped()
        for f, n, total in groups[:12]:
            t.add_row(Text(f.severity, style=_STYLE[f.severity]), f.code, str(total), self._one_line(f, n))
        parts: list[Any] = [Text(self._headline(), style="bold")]
        if (ll := self._lengths_line()) is not None:
            parts.append(Text(ll))
        parts.append(Text(self._dups_line()))
        if self.findings:
            parts.append(t)
        if len(groups) > 12:
            parts.append(Text(f"... and {len(groups) - 12} more kinds of findings"))
        sc = self.sections.get("spot_check")
        if sc and sc.get("path"):
            parts.append(Text(f"spot check: {sc['records']} records in {sc['path']}"))
        parts.append(Text(self._verdict(), style="bold red" if self.has_errors else "bold green"))
        return Group(*parts)

    def rich_report(self) -> Any:
        """The full report: files, lengths, balance, near-duplicate clusters, findings, verdict."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        ft = Table(title="files", title_justify="left")
        for c in ("file", "split", "format", "records", "loadable"):
            ft.add_column(c, justify="right" if c in ("records", "loadable") else "left", overflow="fold")
        for f in self.files:
            ft.add_row(f.path, f.split, f.format or "?", str(f.records), str(f.converted))
        parts.append(ft)

        L = self.sections.get("lengths")
        if L and L.get("total"):
            lt = Table(title=f"lengths in {L['unit']} of the rendered template ({self.tokenizer.get('template', '')})", title_justify="left")
            lt.add_column("")
            keys = ["p50", "p90", "p95", "p99", "max", "mean"]
            for k in keys:
                lt.add_column(k, justify="right")
            for part in ("prompt", "completion", "total"):
                lt.add_row(part, *[str(L[part].get(k, "")) for k in keys])
            parts.append(lt)
            if L.get("max_seq_len"):
                parts.append(Text(f"max_seq_len {L['max_seq_len']}: {L['over_max_seq_len']} records over" + (" " + _over_words(L) if L["over_max_seq_len"] else "")))
            if L.get("note"):
                parts.append(Text(L["note"], style="yellow"))

        B = self.sections.get("balance") or {}
        rows = ([B["tasks"]] if B.get("tasks") else []) + B.get("labels", [])
        if rows:
            bt = Table(title="balance (train)", title_justify="left")
            for c in ("over", "source", "records", "classes", "largest classes", "max/min", "largest share"):
                bt.add_column(c, overflow="fold")
            for d in rows:
                top = ", ".join(f"{k}: {v}" for k, v in list(d["counts"].items())[:3])
                ratio = "inf (one class)" if d["single_class"] else f"{d['imbalance_ratio']:.1f}x"
                style = "yellow" if d["flagged"] else ""
                bt.add_row(d["name"], d["source"], str(d["records"]), str(d["classes"]), top, Text(ratio, style=style), f"{d['largest_share']:.0%}")
            parts.append(bt)

        N = self.sections.get("near_duplicates") or {}
        if N.get("clusters"):
            nt = Table(title=f"near-duplicate clusters (Jaccard >= {N['threshold']:g}, {N['clusters_total']} in all)", title_justify="left")
            for c in ("size", "min J", "records", "example"):
                nt.add_column(c, overflow="fold")
            for c in N["clusters"][:8]:
                nt.add_row(str(c["size"]), f"{c['min_jaccard']:.2f}", ", ".join(c["records"][:3]), c["examples"][0] if c["examples"] else "")
            parts.append(nt)

        t = Table(title="findings", title_justify="left", show_lines=True)
        t.add_column("severity", no_wrap=True)
        t.add_column("code", overflow="fold", max_width=24)
        t.add_column("count", justify="right", no_wrap=True)
        t.add_column("finding, examples, fix", overflow="fold", ratio=1)
        for f in self.findings:
            cell = Text(f.message)
            if f.examples:
                cell.append("\ne.g. " + ", ".join(f.examples[:3]) + (" ..." if f.count > 3 else ""), style="dim")
            if f.fix:
                cell.append("\nfix: " + f.fix, style="green")
            t.add_row(Text(f.severity, style=_STYLE[f.severity]), f.code, str(f.count), cell)
        parts.append(t if self.findings else Text("no findings", style="green"))
        sc = self.sections.get("spot_check")
        if sc and sc.get("path"):
            parts.append(Text(f"spot check: {sc['records']} records written to {sc['path']} (mark each one ok/fix/drop, "
                              "export the marks, then: tunelab audit DATA --apply-review spotcheck-marks.csv --fix OUT; docs/audit.md)"))
        parts.append(Text(self._verdict(), style="bold red" if self.has_errors else "bold green"))
        return Group(*parts)


def _clean(x: Any) -> Any:
    """JSON-safe: no NaN/inf (null instead), tuples as lists, dict keys as strings."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


def _over_words(L: dict) -> str:
    """What happens to the records over max_seq_len, in the words of the configured truncation."""
    model = L.get("truncation_model", "")
    if model.startswith("data.truncation: drop"):
        return "(truncation: drop, so they are not trained)"
    if model.startswith("data.truncation: truncate_prompt"):
        return "(truncation: truncate_prompt, so their prompts are cut from the left)"
    return (f"({L['completion_cut_partly']} lose completion tokens partly, {L['completion_cut_entirely']} entirely, "
            "under right truncation)")
