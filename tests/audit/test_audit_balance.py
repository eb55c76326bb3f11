"""Balance over tasks and labels, including the single-label case."""

from __future__ import annotations

import math

from audit_helpers import audit, write_jsonl


def labelled(path, counts: dict[str, int], extra: str = ""):
    rows = []
    for label, n in counts.items():
        rows += [{"prompt": f"Review {label} {k}{extra}: is it good?", "completion": label + extra} for k in range(n)]
    return write_jsonl(path, rows)


def test_single_label_is_flagged(tmp_path):
    f = labelled(tmp_path / "one.jsonl", {"positive": 200})
    rep = audit([f], near_dups=False)
    (s,) = rep.finding("single_label")
    assert s.severity == "warning" and s.count == 200 and "'positive'" in s.message and "200/200" in s.message
    (d,) = rep.sections["balance"]["labels"]
    assert d["single_class"] and d["imbalance_ratio"] is None and d["largest_share"] == 1.0 and d["flagged"]
    assert rep.results["balance"].labels[0].ratio == math.inf


def test_imbalance_above_threshold_warns_and_balanced_passes(tmp_path):
    skew = labelled(tmp_path / "skew.jsonl", {"yes": 220, "no": 20})
    fine = labelled(tmp_path / "fine.jsonl", {"positive": 111, "negative": 89})
    rep = audit([skew, fine], near_dups=False)
    (w,) = rep.finding("label_imbalance")
    assert w.message.startswith("skew:") and "11.0x" in w.message and "92%" in w.message
    labels = {d["name"]: d for d in rep.sections["balance"]["labels"]}
    assert labels["fine"]["imbalance_ratio"] == round(111 / 89, 3) and not labels["fine"]["flagged"]
    assert labels["skew"]["counts"] == {"yes": 220, "no": 20}


def test_free_text_is_not_a_label(tmp_path):
    rows = [{"prompt": f"Write line {k}.", "completion": f"This is line number {k} of the poem."} for k in range(300)]
    rep = audit([write_jsonl(tmp_path / "free.jsonl", rows)], near_dups=False)
    assert rep.sections["balance"]["labels"] == []


def test_small_label_sets_need_enough_records(tmp_path):
    rep = audit([labelled(tmp_path / "tiny.jsonl", {"yes": 50})], near_dups=False)
    assert not rep.finding("single_label")  # 50 records: not enough to call it a label set


def test_label_field_and_stray_tokens(tmp_path):
    rows = [{"instruction": f"Classify {k}", "input": "", "output": "...", "label": "spam" if k < 30 else "ham"} for k in range(300)]
    rep = audit([write_jsonl(tmp_path / "field.jsonl", rows)], near_dups=False)
    (d,) = rep.sections["balance"]["labels"]
    assert d["source"] == "label field" and d["counts"] == {"ham": 270, "spam": 30} and not d["flagged"]
    # completions with a stray end-of-text marker still count as the same label
    tagged = labelled(tmp_path / "tagged.jsonl", {"positive": 150, "negative": 60}, extra="<|endoftext|>")
    rep = audit([tagged], near_dups=False)
    assert rep.sections["balance"]["labels"][0]["counts"] == {"positive": 150, "negative": 60}


def test_task_imbalance(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": f"Q{k}?", "completion": f"A{k} long answer {k}"} for k in range(330)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"q{k}?", "completion": f"a{k} other answer {k}"} for k in range(30)])
    rep = audit([big, small], near_dups=False)
    (t,) = rep.finding("task_imbalance")
    assert "11.0x" in t.message
    assert rep.sections["balance"]["tasks"]["counts"] == {"big": 330, "small": 30}
