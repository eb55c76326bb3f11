"""tunelab sweep on a tiny task where one LR clearly wins, its resume, and the HTML reports of
the sweep and of the full run, loaded in a real headless chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import make_learnable_llama, write_jsonl
from tunelab.plan.sweep import Trial, pick_winner

REPO = Path(__file__).resolve().parents[2]
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
OUTPUT = Path(os.environ.get("TUNELAB_TEST_OUTPUT", REPO / "test-output"))
LRS = "1e-4,1e-2"  # 8 steps: 1e-2 learns the task, 1e-4 barely moves


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _tunelab(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("sweep")
    model_dir = make_learnable_llama(d / "model", tokenizer)
    write_jsonl(d / "train.jsonl", [{"instruction": f"Repeat the word: {w}", "output": w} for w in WORDS])
    write_jsonl(d / "eval.jsonl", [{"instruction": f"Say the word {w}", "output": w} for w in WORDS])
    cfg = d / "tiny.yaml"
    cfg.write_text(f"model: {{name: {model_dir}, dtype: fp32}}\noutput_dir: {d / 'run'}\n"
                   "data: {train: [train.jsonl], eval: eval.jsonl, audit: off}\n"
                   "lora: {rank: 4, targets: all-linear, dropout: 0.0}\n"
                   "train: {max_steps: 16, batch_size: 8, warmup: 0.05, seed: 0}\n"
                   "report: {samples: 2, sample_tokens: 4}\n")
    r = _tunelab("sweep", str(cfg), "--lr", LRS, "--rank", "2,4", "--budget", "0.5", "--then-train", "--out", str(d / "sweep"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, cfg, r


def _trials(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "sweep.jsonl").read_text().splitlines()]


def test_sweep_picks_the_clear_winner(swept):
    d, _, r = swept
    trials = _trials(d / "sweep")
    assert len(trials) == 4 and all(t["status"] == "done" and t["steps"] == 8 for t in trials)
    by = {(t["lr"], t["rank"]): t["eval_loss"] for t in trials}
    for rank in (2, 4):  # the known best LR wins at every rank, by a wide margin
        assert by[(1e-2, rank)] < 0.9 * by[(1e-4, rank)], by
    (winner,) = [t for t in trials if t["winner"]]
    assert winner["lr"] == 1e-2
    assert winner["eval_loss"] <= min(by.values()) * 1.01
    assert "<- winner" in r.stdout and "eval loss" in r.stdout  # the table
    # --then-train: the full run with the winner, its report and doctor findings
    final = d / "sweep" / "final"
    assert json.loads((final / "overrides.json").read_text())[-2:] == ["train.lr=0.01", f"lora.rank={winner['rank']}"]
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "report.html").exists()
    assert (final / "doctor.json").exists() and len(json.loads((final / "samples.json").read_text())) == 2


def test_ties_go_to_the_smaller_rank_then_the_lower_lr():
    t = [Trial("a", 2e-4, 16, 1, 1.000), Trial("b", 1e-4, 8, 1, 1.009), Trial("c", 4e-4, 8, 1, 1.005), Trial("d", 1e-4, 4, 1, 1.02)]
    assert pick_winner(t).trial == "b"  # within 1%: rank 8 beats 16, then lr 1e-4 beats 4e-4; d is 2% off
    assert pick_winner([Trial("x", 1e-4, 8, 1, None, "failed")]) is None


def test_sweep_resumes_without_rerunning_finished_trials(swept):
    d, cfg, _ = swept
    sweep = d / "sweep"
    results = sorted(sweep.glob("trials/*/result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    redo = sweep / "trials" / "lr0.0001-r4"
    (redo / "result.json").unlink()  # as if the sweep had been interrupted during this trial
    r = _tunelab("sweep", str(cfg), "--lr", LRS, "--rank", "2,4", "--budget", "0.5", "--out", str(sweep))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 finished trial(s) reused, 1 to run" in r.stdout
    assert r.stdout.count(": started") == 1 and "trial lr0.0001-r4: started" in r.stdout
    for p, ns in stamps.items():
        if p.parent != redo:
            assert p.stat().st_mtime_ns == ns, p
    assert (redo / "result.json").exists() and [t["lr"] for t in _trials(sweep) if t["winner"]] == [1e-2]


def test_report_verb_and_errors(swept, tmp_path):
    d, _, _ = swept
    out = tmp_path / "r.html"
    r = _tunelab("report", str(d / "sweep" / "final"), "--out", str(out))
    assert r.returncode == 0 and out.exists(), r.stderr
    html = out.read_text()
    assert "lora.rank=" in html and "Doctor" in html and "Sample generations" in html and "best step" in html
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", html)  # nothing loaded from elsewhere: JS and CSS inline
    r = _tunelab("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not a run or sweep dir" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; scripts/install.sh dev does it where it can)")


def _load(page_html: Path, tmp_path: Path, shot: Path) -> dict:
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'tunelab[dev]')")
    exe = _chromium()
    url = page_html.resolve().as_uri()
    errors, requests = [], []
    with pw.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / f"profile-{shot.stem}"), executable_path=exe, headless=True,
                                                   args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 900})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0 && "
                                   "[...document.querySelectorAll('.js-plotly-plot')].every(e => e._fullLayout)", timeout=30000)
            plots = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(e => {
                const r = e.getBoundingClientRect();
                const points = (e.data || []).reduce((n, t) => n + ((t.z || t.y || []).flat().filter(v => v !== null).length), 0);
                const drawn = e.querySelectorAll('.scatterlayer .trace path, .heatmaplayer image, .hm image').length;
                return {id: e.id, traces: (e.data || []).length, points, drawn, w: r.width, h: r.height};
            })""")
            OUTPUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    return {"errors": errors, "requests": [u for u in requests if u != url], "plots": plots}


@pytest.mark.slow
def test_reports_in_a_real_browser(swept, tmp_path):
    d, _, _ = swept
    for name, html in (("run", d / "sweep" / "final" / "report.html"), ("sweep", d / "sweep" / "report.html")):
        shot = OUTPUT / f"report-{name}.png"
        res = _load(html, tmp_path, shot)
        assert res["errors"] == [], res["errors"]
        assert res["requests"] == [], res["requests"]  # no network request: everything is inline
        assert len(res["plots"]) >= (2 if name == "run" else 1 + 2 * 4), res["plots"]
        for p in res["plots"]:
            assert p["traces"] > 0 and p["points"] > 0 and p["drawn"] > 0 and p["w"] > 100 and p["h"] > 100, p
        assert shot.exists() and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
