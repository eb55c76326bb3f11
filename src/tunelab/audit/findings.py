"""The unit of an audit's verdict: a :class:`Finding` (what, how bad, how many, where, how to fix)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections import Counter
from typing import Iterable

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)
# Findings list errors first: they are what blocks CI and strict training.
SEVERITY_RANK = {ERROR: 0, WARNING: 1, INFO: 2}
MAX_EXAMPLES = 10  # example ids kept per finding; ``count`` always holds the full number


@dataclass
class Finding:
    """One problem (or fact) found in the data.

    ``count`` is the number of affected records (or groups, when the message says so);
    ``examples`` are record ids ``file:line`` so the user can jump to them.
    """

    code: str
    severity: str
    message: str
    count: int
    examples: list[str] = field(default_factory=list)
    fix: str = ""
    section: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        self.examples = list(self.examples)[:MAX_EXAMPLES]

    def to_dict(self) -> dict:
        return asdict(self)


class FindingList(list):
    """A list of findings with a helper that skips empty ones (count 0 means nothing found)."""

    def add(self, code: str, severity: str, message: str, count: int, examples: Iterable[str] = (), fix: str = "", section: str = "") -> None:
        if count > 0:
            self.append(Finding(code, severity, message, count, list(examples)[:MAX_EXAMPLES], fix, section))


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_RANK[f.severity], f.section, -f.count, f.code))


class Tally:
    """Counts occurrences per code with the first example ids and a breakdown by detail."""

    def __init__(self) -> None:
        self.count: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.details: dict[str, Counter] = {}
        self.ids: dict[str, set] = {}  # code -> record ids (idx) affected, for --fix

    def hit(self, code: str, where: str, detail: str | None = None, idx: int | None = None) -> None:
        self.count[code] += 1
        ex = self.examples.setdefault(code, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)
        if detail is not None:
            self.details.setdefault(code, Counter())[detail] += 1
        if idx is not None:
            self.ids.setdefault(code, set()).add(idx)

    def breakdown(self, code: str, limit: int = 6) -> str:
        d = self.details.get(code)
        if not d:
            return ""
        parts = [f"{k} ({v})" for k, v in d.most_common(limit)]
        more = len(d) - limit
        return ", ".join(parts) + (f", and {more} more" if more > 0 else "")
