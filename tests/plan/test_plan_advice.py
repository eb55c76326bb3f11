"""Strategy advice: method by memory, size-scaled LR, data-driven lengths, retrieval on facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.plan.advice import advise, format_advice
from tunelab.plan.facts import DataFacts, KnowledgeSmell
from tunelab.plan.memory import GB, load_shape

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "model_configs"


def shape(name):
    return load_shape(str(FIX / f"{name}.json"))


def facts(n=5000, p99=700, knowledge=False):
    k = KnowledgeSmell(n, 0.9, 1.0, 0.05) if knowledge else KnowledgeSmell(n, 0.1, 0.4, 0.5)
    return DataFacts(n, 0, "tokens", 1024, {"p50": 300, "p99": p99, "max": 900, "mean": 320.0}, 0, 0, 0, 0.3, k)


@pytest.mark.parametrize("model,memory,method", [
    ("llama-2-7b", 24, "lora"),  # 13.5 GB of bf16 weights + activations fit a 24 GB GPU
    ("llama-2-7b", 12, "qlora"),
    ("llama-2-13b", 24, "qlora"),  # 26 GB of bf16 weights do not
    ("llama-2-70b", 48, "qlora"),  # QLoRA's headline case
    ("llama-2-70b", 24, None),
])
def test_method_follows_memory(model, memory, method):
    a = advise(shape(model), facts(), memory * GB, "cuda")
    assert a.method == method, a.reasons
    if method:
        assert a.estimate.total <= 0.9 * memory * GB
        assert a.batch_size * a.grad_accum >= 8 and a.max_seq_len == 704  # p99 700 rounded up to 64


def test_lr_scales_with_size_and_rank_with_data():
    small = advise(load_shape(str(FIX / "llama-2-7b.json")), facts(n=500), 80 * GB, "cuda")
    assert small.lr == pytest.approx(2e-4) and small.rank == 8 and small.epochs == 3
    big = advise(shape("llama-2-70b"), facts(n=50000), 80 * GB, "cuda")
    assert big.lr == pytest.approx(1e-4) and big.rank == 32 and big.epochs == 1


def test_retrieval_instead_on_knowledge_data():
    a = advise(shape("llama-2-7b"), facts(knowledge=True), 24 * GB, "cuda")
    assert a.retrieval and a.reasons[0].startswith("retrieval instead")
    assert "retrieval (RAG)" in format_advice(a, shape("llama-2-7b"), 24 * GB, "cuda")
    assert not advise(shape("llama-2-7b"), facts(), 24 * GB, "cuda").retrieval


def test_cli_advise_135m_on_cpu_and_7b_on_a_gpu(tmp_path, tokenizer_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = [{"instruction": f"Write the ticket for order {i}", "output": f"TICKET id={i} qty={i % 7}"} for i in range(300)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "-m", "tunelab", "doctor", "--advise", "--model", "smollm2-135m-instruct", "--data", str(data),
                        "--memory", "24GB", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "recommendation: lora" in r.stdout and "lr: 0.001" in r.stdout and "weights loaded" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tunelab", "doctor", "--advise", "--model", str(FIX / "llama-2-7b.json"), "--memory", "24GB",
                        "--device", "cuda", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    adv = json.loads(r.stdout)["advice"]
    assert adv["method"] == "lora" and adv["device"] == "cuda" and set(adv["estimates"]) == {"full", "lora", "qlora"}
    r = subprocess.run([sys.executable, "-m", "tunelab", "doctor", "--advise", "--model", str(tmp_path / "nothing")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "no config.json found locally" in r.stderr and "Traceback" not in r.stderr
