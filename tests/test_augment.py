"""``tunelab augment``: completions and provenance kept, the eval split and the audit keep an
original and its copies on one side, back-translation refuses a model that cannot translate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from tinymodels import make_learnable_llama, write_jsonl
from tunelab.audit.core import run_audit
from tunelab.config import config_from_dict
from tunelab.data.formats import DataError, load_dataset_file
from tunelab.data.mixing import stratified_split
from tunelab.data.pipeline import prepare_conversations
from tunelab.datagen.augment import augment, check_translation, record_id


class Rewriter:
    """A stand-in model: numbered rewrites; 'translates' by tagging and untagging."""

    name = "rewriter"

    def __init__(self, translate: bool = True):
        self.k = 0
        self.translate = translate

    def complete(self, conversations, sampling, on_done=None):
        out = []
        for conv in conversations:
            p = conv[-1]["content"]
            text = p.split("\n\n", 1)[1]
            self.k += 1
            if p.startswith("Rewrite"):
                text = text.removeprefix("Instruction: ")
                out.append(f"Please, {text.lower()} (take {self.k % 3})")
            elif not self.translate:
                out.append(text)  # an English-only model answers in English
            elif "into English" in p:  # the "French" is every word spelt backwards
                out.append("In other words: " + " ".join(w[::-1] for w in text.removeprefix("[fr] ").split()))
            else:
                out.append("[fr] " + " ".join(w[::-1] for w in text.split()))
        return out


ROWS = [{"instruction": f"Name a use of item {i}.", "input": "" if i % 2 else f"context {i}", "output": f"answer {i}", "task": "t" + str(i % 3)}
        for i in range(30)]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]}]


def test_paraphrase_keeps_completions_and_provenance(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS + CHAT)
    res = augment(data, tmp_path / "aug.jsonl", Rewriter(), paraphrase=2)
    rows = [json.loads(x) for x in (tmp_path / "aug.jsonl").read_text().splitlines()]
    originals, copies = rows[:31], rows[31:]
    assert res.originals == 31 and res.augmented == len(copies) == 62
    by_id = {r["id"]: r for r in originals}
    assert len(by_id) == 31 and originals[0]["id"] == record_id(ROWS[0])
    assert [{k: v for k, v in r.items() if k != "id"} for r in originals] == ROWS + CHAT  # originals unchanged
    for c in copies:
        o = by_id[c["augmented_from"]]
        assert c["augmentation"] == {"method": "paraphrase", "model": "rewriter"}
        if "messages" in o:  # the last user turn is rewritten, every other turn kept
            assert c["messages"][-1] == o["messages"][-1] and c["messages"][:3] == o["messages"][:3]
            assert c["messages"][3]["content"].startswith("Please, name a colour.")
        else:
            assert (c["output"], c["input"], c["task"]) == (o["output"], o["input"], o["task"])
            assert c["instruction"] != o["instruction"] and o["instruction"].lower() in c["instruction"]
    assert len({c["id"] for c in copies} | set(by_id)) == 93
    with pytest.raises(FileExistsError, match="never overwrites"):
        augment(data, tmp_path / "aug.jsonl", Rewriter(), paraphrase=1)


def test_back_translation_and_its_probe(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    res = augment(data, tmp_path / "bt.jsonl", Rewriter(), back_translate="fr")
    rows = [json.loads(x) for x in (tmp_path / "bt.jsonl").read_text().splitlines()]
    assert res.augmented == 4 and rows[4]["augmentation"] == {"method": "back-translation", "lang": "fr", "model": "rewriter"}
    assert rows[4]["instruction"] == "In other words: " + ROWS[0]["instruction"] and rows[4]["output"] == ROWS[0]["output"]
    with pytest.raises(DataError, match="cannot translate to French and back: its 'translation' is the English source"):
        check_translation(Rewriter(translate=False), "fr")
    assert not (tmp_path / "none.jsonl").exists()


def test_eval_split_keeps_copies_with_their_original(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    augment(data, tmp_path / "aug.jsonl", Rewriter(), paraphrase=3)
    convs = load_dataset_file(tmp_path / "aug.jsonl").conversations
    assert all(c.group for c in convs)
    for seed in range(5):
        train, ev = stratified_split(convs, 0.2, seed)
        side = defaultdict(set)
        for name, part in (("train", train), ("eval", ev)):
            for c in part:
                side[c.group].add(name)
        assert all(len(s) == 1 for s in side.values()), "an original and a copy on different sides"
        assert len(ev) == pytest.approx(0.2 * len(convs), abs=8) and len(ev) % 4 == 0  # whole families of 4
    # the pipeline's split (what train, sweep and the audit's eval_where use) is the same function
    cfg = config_from_dict({"name": "x", "output_dir": str(tmp_path / "run"), "model": {"name": "m"},
                            "data": {"train": [{"path": str(tmp_path / "aug.jsonl")}], "eval_fraction": 0.25}})
    train, ev, _, _ = prepare_conversations(cfg)
    assert ev and not ({c.group for c in train} & {c.group for c in ev})


def test_audit_reports_a_copy_on_the_other_side_as_leakage(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:10])
    augment(data, tmp_path / "aug.jsonl", Rewriter(), paraphrase=1)
    rows = [json.loads(x) for x in (tmp_path / "aug.jsonl").read_text().splitlines()]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:10] + rows[11:])
    ev = write_jsonl(tmp_path / "eval.jsonl", [rows[10]])  # the copy of record 0
    rep = run_audit([str(train)], [str(ev)])
    assert "train_eval_leakage" in rep.codes()
    pairs = rep.sections["leakage"]["pairs"]
    assert pairs[0]["kind"] == "augmented copy" and pairs[0]["train"].endswith("train.jsonl:1") and pairs[0]["eval"].endswith("eval.jsonl:1")
    assert rep.sections["leakage"]["eval_records_leaked"] == 1
    # records that merely share an id value across files are not a leak
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "instruction": "Say yes.", "output": "yes"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "instruction": "Count to three please.", "output": "1 2 3"}])
    assert "train_eval_leakage" not in run_audit([str(a)], [str(b)]).codes()


@pytest.mark.slow
def test_cli_in_process_with_a_tiny_model(tmp_path, tokenizer):
    model = make_learnable_llama(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tunelab", "augment", str(data), *a, "--model", model], capture_output=True,
                                    text=True, env=env, timeout=600)
    r = run("--paraphrase", "2", "--max-tokens", "12", "--out", str(tmp_path / "p.jsonl"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "augment: 3 records +" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) > 3 and all(c["output"] == ROWS[[record_id(x) for x in ROWS].index(c["augmented_from"])]["output"] for c in rows[3:])
    r = run("--back-translate", "fr", "--out", str(tmp_path / "bt.jsonl"))
    assert r.returncode == 2 and "cannot translate to French and back" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("tunelab: error: augment --back-translate: model ")
    assert not (tmp_path / "bt.jsonl").exists()
