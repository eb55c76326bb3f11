"""``tunelab self-instruct``: prompts and parsing, provenance, classification (output-first) vs
input-first, resume after an interrupted run, and end to end against ``tunelab serve``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from servehelp import Server
from tinymodels import make_learnable_llama, write_jsonl
from tunelab.data.formats import DataError, load_dataset_file
from tunelab.datagen.selfinstruct import (SelfInstructOptions, instruction_prompt, load_seed_tasks, parse_instance, parse_instructions,
                                          read_existing, self_instruct, stats_path)

WORDS = ("apple river castle engine forest garden harbor island jacket kettle lantern meadow needle orchard pepper quartz "
         "rabbit saddle tunnel violin wagon yogurt zebra anchor basket candle desert feather glacier hammer iceberg jungle "
         "kitten ladder mirror nutmeg oyster parrot quiver ribbon spider tomato umbrella velvet walnut badge cactus dolphin").split()
SEEDS = [
    {"id": "s0", "instruction": "Classify the sentiment of the review as positive or negative.", "instances": [{"input": "I loved it.", "output": "Positive"}], "is_classification": True},
    {"id": "s1", "instruction": "Is the following number even or odd?", "instances": [{"input": "7", "output": "Odd"}], "is_classification": True},
    {"id": "s2", "instruction": "Write a haiku about autumn leaves falling.", "instances": [{"input": "", "output": "Red leaves drift and fall"}], "is_classification": False},
    {"id": "s3", "instruction": "Summarize the paragraph in one sentence.", "instances": [{"input": "Cats sleep a lot. They nap all day.", "output": "Cats nap often."}], "is_classification": False},
    {"id": "s4", "instruction": "Suggest a name for a small coffee shop near the sea.", "instances": [{"input": "", "output": "Salty Bean"}], "is_classification": False},
]


class Scripted:
    """A stand-in model: new random-word instructions, yes/no by a rule, Input/Output instances."""

    name = "scripted"

    def __init__(self, fail_at_call: int | None = None, seed: int = 0):
        self.rng = random.Random(seed)
        self.calls = 0
        self.fail_at_call = fail_at_call
        self.prompts: list[str] = []

    def complete(self, conversations, sampling, on_done=None):
        self.calls += 1
        if self.fail_at_call and self.calls >= self.fail_at_call:
            raise KeyboardInterrupt  # the run is interrupted here
        out = []
        for conv in conversations:
            p = conv[-1]["content"]
            self.prompts.append(p)
            if p.startswith("Come up with a series of tasks"):
                a = " ".join(self.rng.sample(WORDS, 7))
                b = " ".join(self.rng.sample(WORDS, 7))
                out.append(f" Describe {a}.\n10. Draw a picture of {b}.\n11. Tell me.\n12. Explain {b} today")
            elif p.startswith("Can the following task"):
                task = p.rsplit("Task: ", 1)[1]
                out.append("Yes" if "rabbit" in task or "apple" in task else "No")
            elif p.startswith("Given the classification task"):
                out.append("Class label: Fruit\nInput: a red round thing\n\nTask: something else")
            else:
                out.append("Input: a question\nOutput: an answer")
        return out


@pytest.fixture
def seeds(tmp_path):
    return write_jsonl(tmp_path / "seeds.jsonl", SEEDS)


def test_prompt_and_parsing():
    p = instruction_prompt(["Write a haiku:", "Sort the list\n of numbers"])
    assert p == "Come up with a series of tasks:\n1. Write a haiku\n2. Sort the list of numbers\n3."
    assert parse_instructions(" Name three rivers.\n4. Add two numbers.\n5) Spell a word") == ["Name three rivers.", "Add two numbers.", "Spell a word"]
    assert parse_instance("Input: 2 + 2\nOutput: 4\n\nTask: next", False) == ("2 + 2", "4")
    assert parse_instance("Output: just this", False) == ("", "just this")
    assert parse_instance("Class label: Odd\nInput: 7", True) == ("7", "Odd")
    assert parse_instance("no structure at all", False) == ("", "no structure at all")


def test_records_are_alpaca_with_provenance_and_classification_is_output_first(tmp_path, seeds):
    out = tmp_path / "gen.jsonl"
    be = Scripted()
    res = self_instruct(seeds, out, be, SelfInstructOptions(n=12, batch_size=4))
    rows = read_existing(out)
    gen = [r for r in rows if r["provenance"]["source"] == "generated"]
    assert res.generated == len(gen) == 12
    assert [r["id"] for r in rows[:5]] == ["s0", "s1", "s2", "s3", "s4"] and all(r["provenance"]["round"] == 0 for r in rows[:5])
    assert all(r["provenance"]["model"] == "scripted" and r["provenance"]["round"] >= 1 for r in gen)
    assert len({r["instruction"] for r in rows}) == len(rows) and len({r["id"] for r in rows}) == len(rows)
    ds = load_dataset_file(out)
    assert ds.format == "alpaca" and len(ds.conversations) == len(rows)
    for r in gen:
        if r["provenance"]["is_classification"]:  # output-first: the label is the output
            assert (r["input"], r["output"]) == ("a red round thing", "Fruit")
        else:
            assert (r["input"], r["output"]) == ("a question", "an answer")
    assert any(r["provenance"]["is_classification"] for r in gen) and not all(r["provenance"]["is_classification"] for r in gen)
    # every "Draw a picture" line was rejected by the keyword filter and counted; short ones too
    st = json.loads(stats_path(out).read_text())
    assert st["rejected"]["blacklisted_keyword"] >= 3 and st["rejected"]["too_short"] >= 1 and st["kept"] >= 12
    assert not any("picture" in r["instruction"] for r in rows)
    # the in-context prompts mix seeds and generated instructions once there are some
    later = [p for p in be.prompts if p.startswith("Come up")][4:]
    assert any(any(g["instruction"] in p for g in gen) for p in later)


def test_resume_after_an_interrupted_run(tmp_path, seeds):
    out = tmp_path / "gen.jsonl"
    with pytest.raises(KeyboardInterrupt):
        self_instruct(seeds, out, Scripted(fail_at_call=5), SelfInstructOptions(n=20, batch_size=4))
    first = out.read_text()
    done = [json.loads(x) for x in first.splitlines()]
    n_before = sum(r["provenance"]["source"] == "generated" for r in done)
    assert 0 < n_before < 20
    with open(out, "a") as f:
        f.write('{"instruction": "half a line')  # killed mid-write
    res = self_instruct(seeds, out, Scripted(seed=1), SelfInstructOptions(n=20, batch_size=4))
    text = out.read_text()
    assert text.startswith(first)  # the records written before stay as they were
    rows = [json.loads(x) for x in text.splitlines()]
    gen = [r for r in rows if r["provenance"]["source"] == "generated"]
    assert res.generated == len(gen) == 20 and len(res.new_records) == 20 - n_before
    assert sum(r["provenance"]["source"] == "seed" for r in rows) == 5  # seeds not written twice
    assert len({r["id"] for r in rows}) == len(rows) and len({r["instruction"].lower() for r in rows}) == len(rows)
    assert min(r["provenance"]["round"] for r in res.new_records) > max(r["provenance"]["round"] for r in done)
    # a finished run is left alone
    again = self_instruct(seeds, out, Scripted(fail_at_call=1), SelfInstructOptions(n=20))
    assert again.new_records == [] and out.read_text() == text


def test_bad_seed_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok", "output": "x"}\n{"instances": []}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a seed task needs a non-empty 'instruction'"):
        load_seed_tasks(bad)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(DataError, match="not written by tunelab self-instruct"):
        read_existing(foreign)


@pytest.mark.slow
def test_end_to_end_against_tunelab_serve(tmp_path, seeds, tokenizer):
    model = make_learnable_llama(tmp_path / "tiny", tokenizer)
    server = Server(model, "--model-name", "tiny")
    try:
        out = tmp_path / "si.jsonl"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "tunelab", "self-instruct", "--seed-tasks", str(seeds), "--n", "20", "--out", str(out),
                            "--base-url", server.url, "--model-name", "tiny", "--max-tokens", "24", "--instance-max-tokens", "12",
                            "--batch-size", "8", "--concurrency", "4"], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "self-instruct: 20 generated records" in r.stdout and "data audit:" in r.stdout
        assert "self-instruct round 1:" in r.stderr  # progress
        assert "HTTP Request" not in r.stderr + r.stdout  # the openai client's per-request log lines stay quiet
        rows = read_existing(out)
        gen = [x for x in rows if x["provenance"]["source"] == "generated"]
        assert len(gen) == 20 and all(x["provenance"]["model"] == "tiny" for x in gen)
        assert all(isinstance(x["instruction"], str) and isinstance(x["input"], str) and x["output"].strip() for x in rows)
        assert load_dataset_file(out).format == "alpaca"
        assert server.alive()
    finally:
        server.stop()
