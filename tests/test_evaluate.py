"""``tunelab eval`` and the diagnosis: metrics against hand-computed values, batched generation
equal to one-at-a-time generation (fp32), an overfit tiny model that fires the overfitting
detector (early stopping keeps the best step) and a memorized one with a positive paraphrase
gap, and the CLI verbs end to end."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tinymodels import make_learnable_llama, write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.pipeline import prepare_conversations
from tunelab.evaluate.metrics import bleu_score, exact_match_score, normalize, rouge_l_score
from tunelab.infer.generate import generate, generate_batched, load_for_inference
from tunelab.train.diagnosis import Diagnoser, RunContext
from tunelab.train.recipe import train

CPU = torch.device("cpu")
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]


# --------------------------------------------------------------------------- metrics

def test_exact_match_normalizes_case_whitespace_and_punctuation():
    assert normalize("  The  Cat, sat!\n") == "the cat sat"
    assert exact_match_score(["Positive.", "negative", "The cat sat"], [["positive"], ["Positive"], ["the  cat sat!", "x"]]) == pytest.approx(200 / 3)


def test_bleu_matches_the_hand_computed_value():
    # 1-4 gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu_score(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, abs=1e-6)
    assert bleu_score(["a b c d e"], [["x y", "a b c d e"]]) == pytest.approx(100.0)  # best of several references


def test_rouge_l_matches_the_hand_computed_value():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6
    assert rouge_l_score(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6, abs=1e-6)
    # mean over prompts, best reference each: (1 + 0) / 2
    assert rouge_l_score(["alpha beta", "gamma"], [["zzz", "alpha beta"], ["delta"]]) == pytest.approx(50.0)


# --------------------------------------------------------------------------- diagnosis units

def test_diagnoser_spikes_grad_norm_nonfinite_and_constant_lr_once_each():
    d = Diagnoser(RunContext(total_steps=100, n_train=5000, warmup=0.0, schedule="constant_with_warmup", min_lr_ratio=0.0))
    assert [f.code for f in d.start()] == ["constant_lr"]
    codes = []
    for s, (loss, gn) in enumerate([(2.0, 1.0)] * 6 + [(5.0, 1.0), (6.0, 50.0), (float("nan"), 1.0), (float("nan"), 1.0)], 1):
        codes += [f.code for f in d.train_step(s, loss, gn)]
    assert codes == ["early_spike_no_warmup", "grad_explosion", "nonfinite"]
    f = d.findings[1]
    assert f.event()["event"] == "diagnosis" and f.doc.startswith("docs/practices.md#") and "fix:" in f.text()


def test_diagnoser_memorizing_floor_only_on_small_data():
    for n_train, expected in ((200, ["memorizing"]), (50000, [])):
        d = Diagnoser(RunContext(total_steps=100, n_train=n_train, warmup=0.05, schedule="cosine", min_lr_ratio=0.0))
        assert d.start() == []
        codes = [f.code for s in range(1, 40) for f in d.train_step(s, max(0.01, 1.0 - 0.05 * s), 1.0)]
        assert codes == expected
        if expected:
            assert d.findings[0].anchor == "overfit-zero-loss" and d.findings[0].step >= 20


# --------------------------------------------------------------------------- trained tiny models

@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("evaluate")
    model_dir = make_learnable_llama(d / "model", tokenizer)
    tr = write_jsonl(d / "train.jsonl", [{"instruction": f"Repeat the word: {w}", "output": w} for w in WORDS])
    ev = write_jsonl(d / "eval.jsonl", [{"instruction": f"Repeat the word: {w}", "output": WORDS[(i + 1) % 8]} for i, w in enumerate(WORDS)])
    para = write_jsonl(d / "para.jsonl", [{"instruction": f"{w}? Say that back to me, exactly as written", "output": w} for w in WORDS])
    general = write_jsonl(d / "general.jsonl", [{"text": f"The {w} is a common English word that people use every day."} for w in WORDS])
    return {"model": model_dir, "train": tr, "eval": ev, "para": para, "general": general, "dir": d}


def _cfg(files, out: Path, eval_file: bool, **train_kw):
    data = {"train": [{"path": str(files["train"])}], "audit": "off"}
    if eval_file:
        data["eval"] = {"path": str(files["eval"])}
    return config_from_dict({
        "name": out.name, "output_dir": str(out), "template": "chatml",
        "model": {"name": files["model"], "dtype": "fp32"}, "data": data,
        "lora": {"rank": 8, "targets": "all-linear", "dropout": 0.0},
        "train": {"batch_size": 8, "lr": 1e-2, "warmup": 0.05, "seed": 0, **train_kw},
    })


@pytest.fixture(scope="module")
def overfit_run(files):
    """8 examples, many epochs, an eval set that the training answers contradict."""
    cfg = _cfg(files, files["dir"] / "overfit", True, max_steps=100, eval_every=5, keep_checkpoints=100, early_stopping={"patience": 2})
    return cfg, train(cfg, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def memorized_run(files):
    """The same 8 examples and no eval set (8 < 40 records): trained to memorization."""
    cfg = _cfg(files, files["dir"] / "memorized", False, max_steps=60)
    return cfg, train(cfg, console=Console(file=io.StringIO()))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_overfitting_is_diagnosed_and_early_stopping_keeps_the_best_step(overfit_run):
    cfg, res = overfit_run
    assert res.stopped_early and res.best_step < res.steps
    assert "overfitting" in [f.code for f in res.findings]
    events = [r for r in _rows(cfg.run_dir) if r["event"] == "diagnosis"]
    over = [r for r in events if r["code"] == "overfitting"]
    assert len(over) == 1 and over[0]["doc"] == "docs/practices.md#overfit-curves" and over[0]["step"] > res.best_step
    # the adapter is the best step's weights
    best = load_file(str(cfg.run_dir / "checkpoints" / f"step-{res.best_step:07d}" / "trainable.safetensors"))
    adapter = load_file(str(cfg.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], best[k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")]) for k in adapter)
    trains = [r for r in _rows(cfg.run_dir) if r["event"] == "train"]
    assert all(r["grad_norm"] is not None and r["grad_norm"] >= 0 for r in trains)  # grad norm logged every step


def test_memorized_model_has_a_positive_paraphrase_gap(memorized_run, files):
    from tunelab.evaluate.paraphrase import paraphrase_gap

    cfg, res = memorized_run
    loaded = load_for_inference(str(cfg.run_dir), device=CPU)
    originals = prepare_conversations(cfg)[0]
    trained = {c.source for c in originals}
    ordered = sorted(originals, key=lambda c: int(c.source.rsplit(":", 1)[1]))
    g = paraphrase_gap(loaded, ordered, trained, str(files["para"]), max_new_tokens=8)
    assert g["pairs"] == 8 and g["em_train_phrasing"] == 100.0
    assert g["memorization_gap"] > 0 and g["right_on_train_wrong_on_paraphrase"]
    assert g["memorization_gap"] == pytest.approx(100.0 * len(g["right_on_train_wrong_on_paraphrase"]) / 8)
    assert all(f["train_record"].startswith(str(files["train"])) for f in g["right_on_train_wrong_on_paraphrase"])


def test_batched_left_padded_generation_equals_one_at_a_time(memorized_run):
    cfg, _ = memorized_run
    loaded = load_for_inference(str(cfg.run_dir), device=CPU)
    assert next(loaded.model.parameters()).dtype == torch.float32
    prompts = [f"Repeat the word: {w}" for w in WORDS] + ["x", "A much longer prompt than the others, with many more tokens in it: piano"]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    one = generate(loaded, convs, max_new_tokens=12)
    for bs in (3, 10):
        assert generate_batched(loaded, convs, max_new_tokens=12, batch_size=bs) == one
    assert one[:8] == WORDS  # the memorized answers, stopped at end of turn


@pytest.mark.slow
def test_cli_eval_and_diagnose(overfit_run, memorized_run, files, tmp_path):
    cfg, res = overfit_run
    out = tmp_path / "eval.json"
    p = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(cfg.run_dir), "--json", str(out), "--max-new-tokens", "8",
                        "--paraphrases", str(files["para"]), "--retention", str(files["general"])],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "generalization gap (train sample vs held-out)" in p.stdout and "memorization gap para.jsonl" in p.stdout
    assert "forgetting on general.jsonl" in p.stdout and "perplexity" in p.stdout
    j = json.loads(out.read_text())
    for k in ("em", "bleu", "rougeL", "loss", "ppl"):
        assert math.isfinite(j["train"][k]) and math.isfinite(j["held_out"][k])
    assert j["train"]["ppl"] == pytest.approx(math.exp(j["train"]["loss"]))
    assert j["held_out"]["n"] == 8 and j["held_out"]["prompts_also_in_train"] == 8
    r = j["retention"]
    assert r["kind"] == "text" and r["delta"]["ppl"] == pytest.approx(r["tuned"]["ppl"] - r["base"]["ppl"])
    assert r["base"]["ppl"] != r["tuned"]["ppl"]

    d = subprocess.run([sys.executable, "-m", "tunelab", "diagnose", str(cfg.run_dir)], capture_output=True, text=True, timeout=300)
    assert d.returncode == 0, d.stderr
    assert "diagnosis: overfitting at step" in d.stdout and "docs/practices.md#overfit-curves" in d.stdout
    assert "* train loss" in d.stdout and "o eval loss" in d.stdout


def test_eval_of_a_bare_model_without_data_is_one_line(files, capsys):
    from tunelab.cli import main

    assert main(["eval", files["model"]]) == 2
    err = capsys.readouterr().err
    assert "needs --data FILE" in err and "Traceback" not in err and err.count("\n") == 1


def test_retention_in_the_config_runs_at_the_end_of_a_run(files, tmp_path, capsys):
    from tunelab.cli import main

    run = tmp_path / "ret"
    cfg_path = tmp_path / "ret.yaml"
    cfg_path.write_text(f"output_dir: {run}\ntemplate: chatml\nmodel: {{name: {files['model']}, dtype: fp32}}\n"
                        f"data: {{train: [{{path: {files['train']}}}], audit: off}}\n"
                        f"lora: {{rank: 4, dropout: 0.0}}\ntrain: {{max_steps: 3, batch_size: 8, lr: 1e-2}}\n"
                        f"eval: {{retention: {files['general']}}}\n")
    assert main(["train", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    r = json.loads((run / "retention.json").read_text())
    assert r["kind"] == "text" and r["base"]["tokens"] > 0 and "ppl" in r["delta"]
    assert r["delta"]["ppl"] == pytest.approx(r["tuned"]["ppl"] - r["base"]["ppl"])
    assert "eval: none: 8 training records are fewer than 40" in out and "forgetting on general.jsonl" in out


def test_generate_every_logs_the_train_vs_held_out_exact_match_gap_without_perturbing_training(files):
    """The eval answers contradict the training ones on the same prompts: as the model memorizes,
    train exact match goes to 100 and held-out to 0. The probe (eval mode, greedy, no RNG)
    leaves the loss trace exactly as a run without it."""
    from tunelab.evaluate.diagnose import diagnose_run

    kw = dict(max_steps=60, eval_every=20, early_stopping={"enabled": False})
    plain = train(_cfg(files, files["dir"] / "plain", True, **kw), console=Console(file=io.StringIO()))
    cfg = _cfg(files, files["dir"] / "probed", True, **kw)
    cfg.eval.generate_every, cfg.eval.generate_sample, cfg.eval.generate_max_tokens = 20, 8, 8
    buf = io.StringIO()
    probed = train(cfg, console=Console(file=buf, width=200))
    assert probed.losses == plain.losses
    ev = [r for r in _rows(cfg.run_dir) if r["event"] == "generate"]
    assert [r["step"] for r in ev] == [20, 40, 60] and all(r["n_train"] == 8 and r["n_eval"] == 8 for r in ev)
    assert ev[-1]["train_em"] == 100.0 and ev[-1]["eval_em"] == 0.0
    assert "step 60: exact match train 100.0 / held-out 0.0 (gap +100.0, 8 + 8 prompts)" in buf.getvalue()
    out = io.StringIO()
    diagnose_run(str(cfg.run_dir), Console(file=out, width=200))
    assert "last: train 100.0, held-out 0.0, gap +100.0" in out.getvalue() and "o held-out EM" in out.getvalue()


def test_generate_every_is_validated():
    from tunelab.config import ConfigError

    with pytest.raises(ConfigError, match="eval.generate_every: must be >= 1"):
        config_from_dict({"eval": {"generate_every": 0}})
