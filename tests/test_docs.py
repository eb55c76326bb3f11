"""Every citation of docs/practices.md in code, messages and docs names an anchor that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _anchors() -> set[str]:
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', (REPO / "docs" / "practices.md").read_text()))


def test_practices_anchors_cited_in_the_code_exist():
    anchors = _anchors()
    assert len(anchors) >= 30
    missing = []
    files = [*sorted((REPO / "src").rglob("*.py")), *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*.py")), REPO / "README.md"]
    for f in files:
        text = f.read_text()
        for m in re.finditer(r"practices\.md#([a-z0-9-]+)", text):
            if m.group(1) not in anchors:
                missing.append(f"{f.relative_to(REPO)}: #{m.group(1)}")
    assert not missing, "cited anchors missing from docs/practices.md:\n" + "\n".join(missing)


def test_no_citation_of_a_document_the_repo_lacks():
    hits = [f"{f.relative_to(REPO)}:{i}" for f in sorted((REPO / "src").rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if "cheatsheet" in line.lower()]
    assert not hits, f"cite docs/practices.md instead of the cheatsheet: {hits}"
