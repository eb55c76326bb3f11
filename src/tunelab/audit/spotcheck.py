"""Spot check: a seeded sample of records, stratified by task (and label), written as HTML
or Markdown for a person to read before training ("sample 100 examples manually").

Each record is shown as the exact training text (the template applied), with the trained
part (what carries loss) told apart from the masked part, and a column for the reviewer's mark.
"""

from __future__ import annotations

import html
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .reader import AuditRecord


def stratified_sample(records: list[AuditRecord], n: int, seed: int, label_of: dict[int, str]) -> list[AuditRecord]:
    """``n`` train records (all if fewer), each stratum (task, label) getting its share (at least one)."""
    pool = [r for r in records if r.conv is not None and r.split == "train"]
    if n <= 0 or not pool:
        return []
    if n >= len(pool):
        return pool
    strata: dict[tuple, list[AuditRecord]] = defaultdict(list)
    for r in pool:
        strata[(r.task or "", label_of.get(r.idx, ""))].append(r)
    keys = sorted(strata)
    # Largest remainder allocation, then at least one per stratum while the budget allows.
    quota = {k: n * len(strata[k]) / len(pool) for k in keys}
    alloc = {k: int(quota[k]) for k in keys}
    for k in sorted(keys, key=lambda k: quota[k] - alloc[k], reverse=True)[: n - sum(alloc.values())]:
        alloc[k] += 1
    empty = [k for k in keys if alloc[k] == 0]
    for k in empty:
        donor = max(keys, key=lambda d: alloc[d])
        if alloc[donor] <= 1:
            break
        alloc[donor] -= 1
        alloc[k] = 1
    rng = random.Random(seed)
    out: list[AuditRecord] = []
    for k in keys:
        out += sorted(rng.sample(strata[k], min(alloc[k], len(strata[k]))), key=lambda r: r.idx)
    return out


def segments(rec: AuditRecord, renderer: Any) -> list[tuple[str, bool]]:
    """The rendered text as (text, trained) runs; without a renderer a plain role: text view."""
    conv = rec.conv
    if renderer is not None:
        try:
            rt = renderer.render_with_offsets(conv)
        except Exception as e:  # the template error is also a finding; show it here too
            return [(f"[cannot render: {e}]", False)]
        out, pos = [], 0
        for a, b in rt.trained:
            if a > pos:
                out.append((rt.text[pos:a], False))
            out.append((rt.text[a:b], True))
            pos = b
        if pos < len(rt.text):
            out.append((rt.text[pos:], False))
        return out
    if conv.is_text:
        return [(conv.text, True)]
    out = []
    for m in conv.messages:
        out.append((f"{m['role']}: ", False))
        out.append((m["content"] + "\n", m["role"] == "assistant"))
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12.5px;font-family:ui-monospace,monospace}
.m{color:#666;background:#f2f2f2}
.t{background:#d9f7d9;color:#033;outline:1px solid #9c9}
.legend span{padding:2px 6px;margin-right:8px}
td.mark{white-space:nowrap;min-width:10em}
"""

_JS = """
function exportMarks(){
  const rows=[["n","record","mark","note"]];
  document.querySelectorAll("tr[data-id]").forEach(tr=>{
    const m=tr.querySelector("input[type=radio]:checked");
    rows.push([tr.dataset.n,tr.dataset.id,m?m.value:"",tr.querySelector("input[type=text]").value]);
  });
  const csv=rows.map(r=>r.map(x=>'"'+String(x).replace(/"/g,'""')+'"').join(",")).join("\\n");
  const a=document.createElement("a");a.href=URL.createObjectURL(new Blob([csv],{type:"text/csv"}));
  a.download="spotcheck-marks.csv";a.click();
}
"""


def to_html(sample: list[AuditRecord], renderer: Any, label_of: dict[int, str], title: str) -> str:
    rows = []
    for k, r in enumerate(sample, 1):
        body = "".join(f'<span class="{"t" if t else "m"}">{html.escape(s)}</span>' for s, t in segments(r, renderer))
        label = label_of.get(r.idx)
        meta = html.escape(r.task or "") + (f"<br>label: <b>{html.escape(label)}</b>" if label else "")
        marks = "".join(f'<label><input type="radio" name="m{k}" value="{v}"> {v}</label><br>' for v in ("ok", "fix", "drop"))
        rows.append(
            f'<tr data-n="{k}" data-id="{html.escape(r.where)}"><td>{k}</td><td>{html.escape(r.where)}</td><td>{meta}</td>'
            f'<td><pre>{body}</pre></td><td class="mark">{marks}<input type="text" placeholder="note" size="14"></td></tr>'
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{_JS}</script></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='legend'><span class='t'>trained (carries loss)</span><span class='m'>masked (prompt, template)</span>"
        f" {len(sample)} records, seeded and stratified by task and label. "
        f"<button onclick='exportMarks()'>export marks (CSV)</button></p>"
        "<table><tr><th>#</th><th>record</th><th>task / label</th><th>training text</th><th>reviewer's mark</th></tr>"
        + "\n".join(rows) + "</table></body></html>\n"
    )


def to_markdown(sample: list[AuditRecord], renderer: Any, label_of: dict[int, str], title: str) -> str:
    lines = [f"# {title}", "",
             f"{len(sample)} records, seeded and stratified by task and label. In each training text the part between "
             "⟦ and ⟧ is **trained** (carries loss); everything else is masked (prompt, template).",
             "Mark each record in the table: ok / fix / drop.", "",
             "| # | record | task | label | mark |", "| --- | --- | --- | --- | --- |"]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    for k, r in enumerate(sample, 1):
        lines.append(f"| {k} | [{esc(r.where)}](#r{k}) | {esc(r.task or '')} | {esc(label_of.get(r.idx, ''))} | ☐ ok ☐ fix ☐ drop |")
    for k, r in enumerate(sample, 1):
        text = "".join(f"⟦{s}⟧" if t else s for s, t in segments(r, renderer))
        longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
        fence = "`" * max(3, longest + 1)
        lines += ["", f'<a id="r{k}"></a>', f"## {k}. {r.where}", "", f"task: {r.task or '-'}"
                  + (f" · label: {label_of[r.idx]}" if r.idx in label_of else ""), "", fence + "text", text, fence,
                  "", "Mark: ☐ ok ☐ fix ☐ drop — note:"]
    return "\n".join(lines) + "\n"


def write_spot_check(path: str | Path, records: list[AuditRecord], n: int, seed: int, renderer: Any,
                     label_of: dict[int, str], title: str = "tunelab audit: spot check") -> dict:
    path = Path(path)
    sample = stratified_sample(records, n, seed, label_of)
    fmt = "markdown" if path.suffix.lower() in (".md", ".markdown") else "html"
    text = (to_markdown if fmt == "markdown" else to_html)(sample, renderer, label_of, title)
    atomic_write_text(path, text)
    strata = len({(r.task, label_of.get(r.idx)) for r in sample})
    return {"path": str(path), "format": fmt, "records": len(sample), "strata": strata, "seed": seed}

