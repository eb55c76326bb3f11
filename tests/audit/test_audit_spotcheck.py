"""Spot check: seeded, stratified sample; the training text with trained and masked parts apart."""

from __future__ import annotations

import re
from collections import Counter

from audit_helpers import audit, write_jsonl

from tunelab.audit.spotcheck import stratified_sample


def _data(tmp_path):
    a = write_jsonl(tmp_path / "sentiment.jsonl",
                    [{"prompt": f"Review {k}: fine? ", "completion": "yes" if k % 4 else "no"} for k in range(200)])
    b = write_jsonl(tmp_path / "chat.jsonl",
                    [{"messages": [{"role": "user", "content": f"Tell me <fact> #{k}"}, {"role": "assistant", "content": f"Fact {k} & more."}]}
                     for k in range(40)])
    return a, b


def test_html_spot_check(tmp_path, chatml):
    a, b = _data(tmp_path)
    out = tmp_path / "spot.html"
    rep = audit([a, b], renderer=chatml, sample=24, spot_check_path=str(out), seed=3, near_dups=False)
    html = out.read_text()
    sc = rep.sections["spot_check"]
    assert sc["records"] == 24 and sc["format"] == "html" and sc["path"] == str(out)
    rows = re.findall(r'<tr data-n="(\d+)" data-id="([^"]+)">', html)
    assert len(rows) == 24
    # stratified: each (task, label) stratum is represented, in proportion
    by_stratum = Counter()
    for _, where in rows:
        path, line = where.rsplit(":", 1)
        by_stratum[(path.endswith("chat.jsonl"), int(line) % 4 == 1 if path.endswith("sentiment.jsonl") else None)] += 1
    assert set(by_stratum) == {(False, True), (False, False), (True, None)}
    # the exact training text, escaped; trained spans marked apart from masked ones
    assert '<span class="t">Fact' in html and "&lt;|im_end|&gt;</span>" in html
    assert '<span class="m">&lt;|im_start|&gt;user\nTell me &lt;fact&gt;' in html
    assert html.count('type="radio"') == 24 * 3  # the reviewer's mark column
    # seeded: the same sample again
    rep2 = audit([a, b], renderer=chatml, sample=24, spot_check_path=str(tmp_path / "again.html"), seed=3, near_dups=False)
    assert re.findall(r'data-id="([^"]+)"', (tmp_path / "again.html").read_text()) == [w for _, w in rows]
    assert rep2.sections["spot_check"]["records"] == 24


def test_markdown_spot_check(tmp_path, chatml):
    a, b = _data(tmp_path)
    out = tmp_path / "spot.md"
    audit([a, b], renderer=chatml, sample=5, spot_check_path=str(out), near_dups=False)
    md = out.read_text()
    assert md.count("☐ ok ☐ fix ☐ drop") == 10  # a mark in the table and under each record
    assert "| # | record | task | label | mark |" in md
    assert re.search(r"⟦(yes|no)<\|im_end\|>⟧", md) or re.search(r"⟦Fact \d+ & more\.<\|im_end\|>⟧", md)


def test_sample_size_and_strata_edge_cases(tmp_path):
    a, b = _data(tmp_path)
    rep = audit([a, b])
    recs = rep.records
    assert len(stratified_sample(recs, 1000, 0, {})) == 240  # fewer records than asked: all of them
    assert stratified_sample(recs, 0, 0, {}) == []
    two = stratified_sample(recs, 2, 0, {})
    assert {r.path for r in two} == {str(a), str(b)}  # one per task even when tiny
