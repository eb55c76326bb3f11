"""tunelab doctor: every rule on a crafted config that fires it and one that does not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import config_from_dict
from tunelab.plan.doctor import ERROR, INFO, WARN, Context, check
from tunelab.plan.facts import DataFacts, KnowledgeSmell, data_facts, knowledge_smell
from tunelab.plan.memory import GB, ModelShape, Workload, estimate_all

REPO = Path(__file__).resolve().parents[2]
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
        "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64, "model_type": "llama", "dtype": "float32"}
ANCHORS = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', (REPO / "docs" / "practices.md").read_text()))
SEVEN_B = json.loads((REPO / "tests" / "fixtures" / "model_configs" / "llama-2-7b.json").read_text())


def facts(n_train=500, n_eval=50, over=0, p99=200, knowledge=None, unit="tokens"):
    return DataFacts(n_train, n_eval, unit, 1024, {"p50": 100, "p99": p99, "max": p99 + 10, "mean": 110.0}, over, 0, 0, 0.4,
                     knowledge or KnowledgeSmell(n_train, 0.1, 0.5, 0.5))


def ctx(overrides=None, shape=SMOL, data=None, memory=64 * GB, device="cpu", template=True):
    d = {"data": {"train": [{"path": "x.jsonl"}], "eval_fraction": 0.1}, "train": {"lr": 2e-4}}
    for k, v in (overrides or {}).items():
        node = d
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    cfg = config_from_dict(d)
    s = ModelShape.from_dict(shape, "m") if shape else None
    c = Context(cfg, shape=s, has_chat_template=template, facts=data if data is not None else facts(), memory=memory, device=device)
    if s is not None:
        c.estimates = estimate_all(s, Workload.from_config(cfg, device, 512, 0.4))
    return c


def codes(c: Context) -> dict[str, str]:
    out = {}
    for f in check(c):
        assert f.what and f.why and f.fix and f.link.startswith("docs/practices.md#"), f
        assert f.anchor in ANCHORS, f"{f.code} cites docs/practices.md#{f.anchor}, which does not exist"
        out[f.code] = f.severity
    return out


def test_a_sound_config_has_no_findings():
    assert codes(ctx()) == {}


@pytest.mark.parametrize("overrides,shape,fires", [
    ({"train.lr": 1e-6}, SMOL, True),  # far below
    ({"train.lr": 1e-2}, SMOL, True),  # far above even for 135M
    ({"train.lr": 1e-3}, SMOL, False),  # above 5e-4, but inside the range scaled for 135M (the measured winner there)
    ({"train.lr": 1e-3}, SEVEN_B, True),  # the same LR on 7B is out of range
    ({"train.lr": 2e-4}, SEVEN_B, False),
    ({"method": "full", "train.lr": 2e-4}, SEVEN_B, True),  # full fine-tuning above 1e-4
    ({"method": "full", "train.lr": 1e-5}, SEVEN_B, False),
])
def test_learning_rate_scaled_by_model_size(overrides, shape, fires):
    c = codes(ctx(overrides, shape, memory=2000 * GB))
    assert (c.get("lr_range") == WARN) is fires, c


def test_lr_finding_names_the_sweep():
    f = [f for f in check(ctx({"train.lr": 1e-6})) if f.code == "lr_range"][0]
    assert "tunelab sweep" in f.fix and f.link == "docs/practices.md#hp-lr"


@pytest.mark.parametrize("overrides,data,code,severity", [
    ({"lora.rank": 256}, None, "lora_rank", WARN),
    ({"lora.rank": 16, "lora.alpha": 128}, None, "lora_alpha", WARN),
    ({"lora.rank": 16, "lora.alpha": 2}, None, "lora_alpha", WARN),
    ({"lora.targets": "all-linear"}, facts(n_train=300), "lora_targets", INFO),
])
def test_lora_shape_fires(overrides, data, code, severity):
    assert codes(ctx(overrides, data=data)).get(code) == severity


@pytest.mark.parametrize("overrides,data", [
    ({"lora.rank": 64}, None),
    ({"lora.rank": 16, "lora.alpha": 16}, None),
    ({"lora.targets": "all-linear"}, facts(n_train=5000)),  # enough data for wide targets
    ({"lora.targets": ["q_proj", "v_proj"]}, facts(n_train=300)),
])
def test_lora_shape_quiet(overrides, data):
    assert not {"lora_rank", "lora_alpha", "lora_targets"} & set(codes(ctx(overrides, data=data)))


def test_epochs():
    assert codes(ctx({"train.epochs": 5})).get("epochs") == WARN
    assert "epochs" not in codes(ctx({"train.epochs": 3}))
    # 200 steps x 8 = 1600 examples over 200 records: 8 passes toward zero loss
    assert codes(ctx({"train.max_steps": 200}, data=facts(n_train=200))).get("epochs") == WARN
    assert "epochs" not in codes(ctx({"train.max_steps": 50}, data=facts(n_train=200)))


def test_schedule():
    assert codes(ctx({"train.warmup": 0.0})).get("warmup") == WARN
    assert codes(ctx({"train.warmup": 0.3})).get("warmup") == WARN
    assert "warmup" not in codes(ctx({"train.warmup": 0.05}))
    assert codes(ctx({"train.schedule": "constant_with_warmup"})).get("no_decay") == WARN
    assert codes(ctx({"train.min_lr_ratio": 1.0})).get("no_decay") == WARN
    assert "no_decay" not in codes(ctx({"train.schedule": "linear"}))


def test_eval_and_masking():
    assert codes(ctx({"data.eval_fraction": 0.0})).get("no_eval") == WARN
    assert "no_eval" not in codes(ctx({"data.eval": {"path": "e.jsonl"}, "data.eval_fraction": 0.0}))
    assert codes(ctx({"data.train_on": "all"})).get("train_on_all") == WARN
    assert "train_on_all" not in codes(ctx({"data.train_on": "last_assistant"}))


def test_template():
    assert codes(ctx({"template": "auto"}, template=False)).get("no_template") == ERROR
    assert "no_template" not in codes(ctx({"template": "chatml"}, template=False))
    assert codes(ctx({"template": "chatml"}, template=True)).get("template_differs") == WARN
    assert "template_differs" not in codes(ctx({"template": "auto"}, template=True))


def test_batching():
    assert codes(ctx({"train.batch_size": 2, "train.grad_accum": 2})).get("small_batch") == WARN
    assert "small_batch" not in codes(ctx({"train.batch_size": 2, "train.grad_accum": 4}))


def test_truncation_counts_and_suggests_a_length():
    c = ctx(data=facts(n_train=450, n_eval=50, over=40, p99=1500))
    f = [f for f in check(c) if f.code == "truncation"][0]
    assert "40 of 500 records (8.0%)" in f.what and "max_seq_len: 1536" in f.fix
    assert "truncation" not in codes(ctx(data=facts(n_train=450, n_eval=50, over=5)))  # 1%: under the 2% line


def test_tiny_data_with_many_steps():
    assert codes(ctx({"train.max_steps": 100}, data=facts(n_train=40))).get("tiny_data") == WARN
    assert "tiny_data" not in codes(ctx({"train.epochs": 2}, data=facts(n_train=40)))
    assert "tiny_data" not in codes(ctx({"train.max_steps": 100}, data=facts(n_train=400)))


def test_memory():
    seven = dict(SEVEN_B)
    # QLoRA chosen on a GPU where LoRA fits
    assert codes(ctx({"method": "qlora"}, seven, memory=80 * GB, device="cuda")).get("qlora_not_needed") == WARN
    assert "qlora_not_needed" not in codes(ctx({"method": "qlora"}, seven, memory=12 * GB, device="cuda"))
    # LoRA on a 7B in 16 GB (batch 8 x 512 tokens): does not fit, QLoRA is the fix
    f = [f for f in check(ctx({"method": "lora"}, seven, memory=16 * GB, device="cuda")) if f.code == "memory_too_small"][0]
    assert f.severity == ERROR and "method: qlora" in f.fix
    assert "memory_too_small" not in codes(ctx({"method": "lora"}, seven, memory=40 * GB, device="cuda"))


# ------------------------------------------------------------------ the data rules on real records

def _records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def knowledge_rows(n=60):
    people = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Emmy Noether", "Carl Gauss", "Marie Curie", "Niels Bohr", "Lise Meitner"]
    cities = ["Vienna", "Lisbon", "Oslo", "Quito", "Lima", "Dublin", "Prague", "Cairo"]
    out = []
    for i in range(n):
        p, c = people[i % 8], cities[(i * 3) % 8]
        out.append({"instruction": f"Tell me about record {i}.",
                    "output": [f"{p} moved to {c} in {1800 + i}.", f"In {1900 + i}, the population of {c} was {1000 * i + 7}.",
                               f"The {c} Museum opened on {i % 28 + 1} May {1850 + i}.", f"Built in {1700 + i}, the bridge spans {i + 40} metres near {c}."][i % 4]})
    return out


def test_knowledge_smell_fires_on_facts_not_on_formats_or_labels():
    facts_pairs = [(r["instruction"], r["output"]) for r in knowledge_rows()]
    assert knowledge_smell(facts_pairs).fires
    # a format task: the completion's facts come from the prompt
    fmt = [(f"Order {i} blue mugs to Paris for Ada Lovelace", f"TICKET item=mug qty={i} city=Paris name=Ada Lovelace") for i in range(60)]
    assert not knowledge_smell(fmt).fires
    labels = [(f"Review {i}: great product", "positive" if i % 2 else "negative") for i in range(60)]
    assert not knowledge_smell(labels).fires


def test_knowledge_and_truncation_rules_from_files(tmp_path, tokenizer):
    from tunelab.data.render import Renderer

    r = Renderer(tokenizer, "auto")
    kn = data_facts([str(_records(tmp_path / "facts.jsonl", knowledge_rows()))], [], r, 1024)
    c = ctx(data=kn)
    f = [f for f in check(c) if f.code == "knowledge_injection"][0]
    assert "SFT teaches format and behaviour, not facts; consider retrieval (RAG)" in f.why and "retrieval" in f.fix
    long_rows = [{"prompt": "word " * (400 if i % 10 == 0 else 20), "completion": "ok"} for i in range(100)]
    lf = data_facts([str(_records(tmp_path / "long.jsonl", long_rows))], [], r, 256)
    assert lf.over == 10 and lf.suggested_max_seq_len() >= 256
    t = [f for f in check(ctx({"data.max_seq_len": 256}, data=lf)) if f.code == "truncation"][0]
    assert "10 of 100 records" in t.what
    ok = data_facts([str(_records(tmp_path / "short.jsonl", long_rows[1:10] * 5))], [], r, 256)
    assert ok.over == 0 and "knowledge_injection" not in codes(ctx(data=ok))


# ------------------------------------------------------------------ through the CLI

def _env():
    return dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _config(tmp_path: Path, model_dir: str, extra: str = "") -> Path:
    rows = [{"instruction": f"Say hello number {i}", "output": f"Hello {i}!"} for i in range(40)]
    _records(tmp_path / "train.jsonl", rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {model_dir}, dtype: fp32}}\noutput_dir: {tmp_path / 'run'}\n"
                   f"data: {{train: [train.jsonl], eval_fraction: 0.2, max_seq_len: 64}}\n"
                   f"train: {{max_steps: 2, batch_size: 4, grad_accum: 2, lr: 1.0e-3, eval_every: 1}}\nlora: {{rank: 4}}\n{extra}")
    return cfg


def test_cli_doctor_json_and_strict(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "template: auto\n")
    r = subprocess.run([sys.executable, "-m", "tunelab", "doctor", str(cfg), "--json", "--set", "train.warmup=0", "--memory", "8GB"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by = {f["code"]: f for f in out["findings"]}
    assert by["warmup"]["severity"] == "warn" and by["warmup"]["link"] == "docs/practices.md#hp-warmup"
    assert set(by["warmup"]) >= {"severity", "what", "why", "fix", "link"}
    # --strict exits 1 only on an error finding: 1 GB of memory is too little for nothing here, so no error
    r = subprocess.run([sys.executable, "-m", "tunelab", "doctor", str(cfg), "--strict", "--set", "train.warmup=0"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and "WARN [warmup]" in r.stdout and "see: docs/practices.md#hp-warmup" in r.stdout


def test_train_runs_the_doctor_and_strict_refuses(tmp_path, tiny_model_dir):
    # a tokenizer without a chat template and template: auto is an error finding
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    cfg = _config(tmp_path, str(bare), "doctor: {strict: true}\n")
    r = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "doctor: 1 error" in r.stdout and "no_template" in r.stdout
    assert "tunelab: error: doctor (strict): 1 error finding(s): no_template" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "adapter").exists()
    doc = json.loads((tmp_path / "run" / "doctor.json").read_text())
    assert [f["code"] for f in doc if f["severity"] == "error"] == ["no_template"]
