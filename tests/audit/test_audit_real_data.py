"""The audit on the real public data in ../shared/data (skipped when the folder is absent).

What is really there (found by this audit, checked by hand):
* t0/*.jsonl: every completion ends in a stray ``<|endoftext|>`` (a special token of the
  SmolLM2 tokenizer, so an error); every rotten_tomatoes_* file holds one label (200/200
  positive: flagged); amazon_polarity_* files are 111/89 (pass).
* alpaca_en_demo.json: no errors; 14 records repeat an earlier one exactly (13 groups, e.g.
  "Describe the color yellow in 3 words." three times), and short answers are listed as info.
* identity.json: {{name}} / {{author}} placeholders meant to be filled before training.
"""

from __future__ import annotations

import pytest
from audit_helpers import SHARED, audit

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def t0_report(auto_renderer):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    files = sorted((SHARED / "t0").glob("*.jsonl"))
    return files, audit(files, renderer=auto_renderer)


def test_t0_stray_endoftext_is_an_error(t0_report):
    files, rep = t0_report
    (f,) = rep.finding("special_token_in_text")
    n = sum(fi.records for fi in rep.files)
    assert f.severity == "error" and f.count == n == 200 * len(files)
    assert "<|endoftext|> in 5600 completions" in f.message
    markers = {m["marker"]: m["records"] for m in rep.sections["artifacts"]["markers"]}
    assert markers == {"<|endoftext|>": {"completion": n}}
    assert rep.exit_code == 1


def test_t0_rotten_tomatoes_single_label_flagged_amazon_passes(t0_report):
    files, rep = t0_report
    rotten = {p.stem for p in files if p.stem.startswith("rotten_tomatoes_")}
    amazon = {p.stem for p in files if p.stem.startswith("amazon_polarity_")}
    assert len(rotten) == 10 and len(amazon) == 9
    single = {f.message.split(":")[0] for f in rep.finding("single_label")}
    assert single == rotten
    labels = {d["name"]: d for d in rep.sections["balance"]["labels"]}
    for name in rotten:
        assert labels[name]["single_class"] and labels[name]["records"] == 200 and labels[name]["flagged"]
    for name in amazon:
        d = labels[name]
        assert sorted(d["counts"].values()) == [89, 111] and not d["flagged"]
    assert not any(f.message.startswith("amazon") for f in rep.finding("label_imbalance"))
    # common_gen is free text: no labels
    assert not any(name.startswith("common_gen") for name in labels)


def test_alpaca_demo_gets_a_clean_bill(shared, auto_renderer):
    rep = audit([shared / "alpaca_en_demo.json"], renderer=auto_renderer)
    assert rep.exit_code == 0 and not rep.codes("error")
    assert rep.codes("warning") == {"exact_duplicate"}
    assert rep.codes("info") <= {"short_completion"}
    (d,) = rep.finding("exact_duplicate")
    assert d.count == 14 and rep.sections["duplicates"]["exact_groups"] == 13
    assert rep.sections["lengths"]["over_max_seq_len"] == 0 and rep.files[0].converted == 999


def test_identity_placeholders(shared):
    rep = audit([shared / "identity.json"], near_dups=False)
    (p,) = rep.finding("placeholder_in_text")
    assert p.count == 85 and "{{name}}" in p.message and "{{author}}" in p.message
