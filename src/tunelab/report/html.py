"""The HTML report: resolved config and overrides, doctor findings, audit summary, curves
(train and eval loss, learning rate, gradient norm; best step and early stop marked), the sweep
heatmap, eval tables, sample generations. plotly draws the plots, its JS inlined once."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional

from ..files import atomic_write_text

EVAL_TABLE_FILES = ("eval_tables.json", "eval_report.json", "evals.json")  # written by the eval verbs, when they exist
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud"]}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:.85em}
.error{color:#b00020;font-weight:600}.warn{color:#a05a00;font-weight:600}.info{color:#2a5db0}
.muted{color:#777}.best{background:#e8f5e9}.plot{min-height:360px}
"""


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(p: Path) -> list[dict]:
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _table(rows: list[dict], cols: Optional[list[str]] = None, best: Optional[int] = None) -> str:
    if not rows:
        return "<p class=muted>none</p>"
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cells = "".join(f"<td>{_esc(_fmt(r.get(c)))}</td>" for c in cols)
        body.append(f"<tr{' class=best' if i == best else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


class _Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.n_plots = 0

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{_esc(text)}</h2>")

    def raw(self, text: str) -> None:
        self.parts.append(text)

    def plot(self, fig: Any) -> None:
        self.n_plots += 1
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{self.n_plots}", config=PLOT_CONFIG,
                                      default_height="380px"))

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        js = get_plotlyjs() if self.n_plots else ""
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
                "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
                "style-src 'unsafe-inline'; img-src data: blob:; font-src data:\">"
                f"<title>{_esc(self.title)}</title><style>{CSS}</style>"
                + (f"<script type='text/javascript'>{js}</script>" if js else "") + "</head><body>"
                + f"<h1>{_esc(self.title)}</h1>" + "".join(self.parts) + "</body></html>")


# --------------------------------------------------------------------------- sections

def _curves(page: _Page, rows: list[dict], label: str = "") -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    train = [r for r in rows if r.get("event") == "train" and r.get("train_loss") is not None]
    evals = [r for r in rows if r.get("event") == "eval" and r.get("eval_loss") is not None]
    stops = [r for r in rows if r.get("event") == "early_stop"]
    if not train and not evals:
        page.raw("<p class=muted>no metrics yet</p>")
        return
    fig = go.Figure()
    if train:
        fig.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["train_loss"] for r in train], name="train loss", mode="lines"))
    if evals:
        fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["eval_loss"] for r in evals], name="eval loss", mode="lines+markers"))
        best = min(evals, key=lambda r: r["eval_loss"])
        fig.add_vline(x=best["step"], line_dash="dash", line_color="green")
        fig.add_trace(go.Scatter(x=[best["step"]], y=[best["eval_loss"]], name=f"best step {best['step']}", mode="markers",
                                 marker=dict(size=12, color="green", symbol="star")))
    for s in stops:
        fig.add_vline(x=s["step"], line_dash="dot", line_color="red")
        y = next((r["eval_loss"] for r in reversed(evals) if r["step"] == s["step"]), s.get("eval_loss"))
        fig.add_trace(go.Scatter(x=[s["step"]], y=[y], name=f"early stop at {s['step']}", mode="markers",
                                 marker=dict(size=12, color="red", symbol="x")))
    fig.update_layout(title=f"{label}loss", xaxis_title="step", yaxis_title="loss", margin=dict(t=50, b=40))
    page.plot(fig)
    lr = [r for r in train if r.get("lr") is not None]
    gn = [r for r in train if r.get("grad_norm") is not None]
    if lr or gn:
        sub = make_subplots(rows=1, cols=2, subplot_titles=("learning rate", "gradient norm (before clipping)"))
        if lr:
            sub.add_trace(go.Scatter(x=[r["step"] for r in lr], y=[r["lr"] for r in lr], name="lr", mode="lines"), row=1, col=1)
        if gn:
            sub.add_trace(go.Scatter(x=[r["step"] for r in gn], y=[r["grad_norm"] for r in gn], name="grad norm", mode="lines"), row=1, col=2)
        sub.update_layout(title=f"{label}schedule and gradients", margin=dict(t=60, b=40), showlegend=False)
        page.plot(sub)


def _config(page: _Page, run: Path) -> None:
    cfg = run / "config.yaml"
    overrides = _read_json(run / "overrides.json") or []
    page.h2("Configuration (resolved)")
    if overrides:
        page.raw("<p>overridden with --set: " + ", ".join(f"<code>{_esc(o)}</code>" for o in overrides) + "</p>")
    else:
        page.raw("<p class=muted>no --set overrides</p>")
    page.raw(f"<pre>{_esc(cfg.read_text()) if cfg.exists() else 'config.yaml missing'}</pre>")


def _doctor(page: _Page, run: Path) -> None:
    page.h2("Doctor")
    found = _read_json(run / "doctor.json")
    if found is None:
        page.raw("<p class=muted>the doctor did not run (doctor.enabled: false)</p>")
        return
    if not found:
        page.raw("<p>no findings: the config follows docs/practices.md</p>")
        return
    rows = "".join(f"<tr><td class={_esc(f.get('severity'))}>{_esc(f.get('severity'))}</td><td>{_esc(f.get('code'))}</td>"
                   f"<td>{_esc(f.get('what'))}</td><td>{_esc(f.get('why'))}</td><td>{_esc(f.get('fix'))}</td>"
                   f"<td><code>{_esc(f.get('link'))}</code></td></tr>" for f in found)
    page.raw(f"<table><tr><th>severity</th><th>rule</th><th>what</th><th>why</th><th>fix</th><th>see</th></tr>{rows}</table>")


def _audit(page: _Page, run: Path) -> None:
    page.h2("Data audit")
    a = _read_json(run / "audit_summary.json")
    if not a:
        page.raw("<p class=muted>no audit (data.audit: off)</p>")
        return
    page.raw(_table([a.get("summary", {})]) + f"<pre>{_esc(a.get('text', ''))}</pre>")


def _eval_tables(page: _Page, run: Path) -> None:
    for name in EVAL_TABLE_FILES:
        data = _read_json(run / name)
        if data is None:
            continue
        page.h2(f"Evaluation ({name})")
        tables = data if isinstance(data, dict) else {"results": data}
        for title, rows in tables.items():
            page.raw(f"<h3>{_esc(title)}</h3>")
            if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
                page.raw(_table(rows))
            elif isinstance(rows, dict) and all(isinstance(v, dict) for v in rows.values()):
                page.raw(_table([{"": k, **v} for k, v in rows.items()]))
            else:
                page.raw(f"<pre>{_esc(json.dumps(rows, indent=1))}</pre>")


def _samples(page: _Page, run: Path) -> None:
    s = _read_json(run / "samples.json")
    if not s:
        return
    page.h2("Sample generations (greedy, the training template)")
    rows = "".join(f"<tr><td><pre>{_esc(x.get('prompt'))}</pre></td><td><pre>{_esc(x.get('before'))}</pre></td>"
                   f"<td><pre>{_esc(x.get('after'))}</pre></td><td><pre>{_esc(x.get('reference'))}</pre></td></tr>" for x in s)
    page.raw(f"<table><tr><th>prompt</th><th>before (base)</th><th>after (trained)</th><th>reference</th></tr>{rows}</table>")


def _sweep(page: _Page, sweep_dir: Path, trials: list[dict]) -> None:
    import plotly.graph_objects as go

    done = [t for t in trials if t.get("eval_loss") is not None]
    page.h2("Sweep: eval loss by learning rate and rank")
    if done:
        lrs = sorted({t["lr"] for t in done})
        ranks = sorted({t["rank"] for t in done})
        z = [[next((t["eval_loss"] for t in done if t["lr"] == lr and t["rank"] == r), None) for lr in lrs] for r in ranks]
        fig = go.Figure(go.Heatmap(z=z, x=[f"{lr:g}" for lr in lrs], y=[str(r) for r in ranks], colorscale="Viridis_r",
                                   text=[[("" if v is None else f"{v:.4f}") for v in row] for row in z], texttemplate="%{text}",
                                   colorbar=dict(title="eval loss")))
        fig.update_layout(title="eval loss (lower is better)", xaxis_title="learning rate", yaxis_title="LoRA rank", xaxis_type="category",
                          yaxis_type="category", margin=dict(t=50, b=40))
        page.plot(fig)
    winner = next((i for i, t in enumerate(trials) if t.get("winner")), None)
    page.raw(_table(trials, ["trial", "lr", "rank", "steps", "eval_loss", "status", "winner", "seconds"], best=winner))
    for t in done:
        rows = _read_jsonl(sweep_dir / "trials" / t["trial"] / "metrics.jsonl")
        if rows:
            page.raw(f"<h3>trial {_esc(t['trial'])}</h3>")
            _curves(page, rows, f"{t['trial']}: ")


def build_report(path: str | Path) -> tuple[str, int]:
    """(HTML, number of plots) for a run dir or a sweep dir."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a run or sweep dir")
    sweep = d / "sweep.jsonl"
    if sweep.exists():
        page = _Page(f"tunelab sweep report: {d.name}")
        trials = _read_jsonl(sweep)
        _sweep(page, d, trials)
        if (d / "config.yaml").exists():
            _config(page, d)
        final = d / "final"
        if (final / "metrics.jsonl").exists():
            page.h2("Full run with the winner")
            _curves(page, _read_jsonl(final / "metrics.jsonl"), "final: ")
        return page.render(), page.n_plots
    if not (d / "metrics.jsonl").exists() and not (d / "config.yaml").exists():
        raise FileNotFoundError(f"{d}: no metrics.jsonl or sweep.jsonl: not a tunelab run or sweep dir")
    page = _Page(f"tunelab run report: {d.name}")
    page.h2("Curves")
    _curves(page, _read_jsonl(d / "metrics.jsonl"))
    _eval_tables(page, d)
    _samples(page, d)
    _doctor(page, d)
    _audit(page, d)
    _config(page, d)
    return page.render(), page.n_plots


def write_report(path: str | Path, out: Optional[str | Path] = None) -> Path:
    text, _ = build_report(path)
    target = Path(out) if out else Path(path) / "report.html"
    atomic_write_text(target, text)
    return target


def write_run_report(run_dir: str | Path) -> Path:
    return write_report(run_dir)
