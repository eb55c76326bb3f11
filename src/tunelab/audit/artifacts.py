"""Format consistency and artifacts: special tokens and template markers inside the text,
unfilled placeholders, completions that are only artifacts or repeat the prompt, stray
leading/trailing whitespace, very short completions, and files that mix formats or field sets.

Special tokens in the text are errors when the tokenizer in use parses them as control
tokens (``<|endoftext|>`` for SmolLM2 becomes token 0, the model then learns to emit an
end-of-text in the middle of an answer); markers of *other* templates (``[INST]``,
``### Response:``) are plain text to this tokenizer and are warnings: they are leftovers of
a different prompt format that the model would learn to write.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..data.formats import detect_format
from .findings import ERROR, INFO, WARNING, FindingList, Tally
from .normalize import TextViews
from .reader import AuditRecord, FileInfo

SECTION = "artifacts"

# Control tokens of common chat models (they are special tokens of *some* tokenizer).
KNOWN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|python_tag|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
    "<|pad|>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>",
)
# Prompt-format markers written as plain text by other templates.
TEMPLATE_MARKERS = (
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "### Instruction:", "### Response:", "### Input:", "### Human:",
    "### Assistant:", "### System:",
)
_GENERIC = r"<\|[A-Za-z0-9_]{1,40}\|>"  # any <|name|> token
_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][A-Za-z0-9_.]*\s*\}\}")


def _alternation(markers: Iterable[str]) -> str:
    return "|".join(re.escape(m) for m in sorted(set(markers), key=len, reverse=True))


_STRIP = re.compile(_alternation(KNOWN_SPECIAL + TEMPLATE_MARKERS) + "|" + _GENERIC)


def strip_markers(text: str) -> str:
    """The text without special tokens and template markers (for labels and emptiness)."""
    return _STRIP.sub("", text) if ("<" in text or "[" in text or "#" in text) else text


def tokenizer_specials(tokenizer: Any) -> set[str]:
    """Strings this tokenizer turns into special (control) tokens when they occur in text."""
    if tokenizer is None:
        return set()
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            out.add(str(tok.content))
    return {t for t in out if t and len(t) > 1}


class MarkerScanner:
    def __init__(self, specials: set[str], have_tokenizer: bool):
        self.specials = specials
        self.have_tokenizer = have_tokenizer
        self.regex = re.compile(_alternation(set(KNOWN_SPECIAL) | set(TEMPLATE_MARKERS) | specials) + "|" + _GENERIC)
        # Every marker starts with one of these characters; most texts hold none of them, and
        # ``c in text`` is far cheaper than running the alternation.
        self._first = "".join(sorted({m[0] for m in set(KNOWN_SPECIAL) | set(TEMPLATE_MARKERS) | specials} | {"<"}))

    def severity(self, marker: str) -> str:
        if marker in self.specials:
            return ERROR
        if not self.have_tokenizer and marker.startswith("<|") and marker.endswith("|>"):
            return ERROR  # no tokenizer to ask: <|name|> is control-token syntax (<s> may well be HTML)
        return WARNING

    def find(self, text: str) -> list[str]:
        for c in self._first:
            if c in text:
                return self.regex.findall(text)
        return []


@dataclass
class ArtifactResult:
    marker_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # marker -> {"prompt": n, "completion": n}
    artifact_only: set = field(default_factory=set)  # record idx whose completion is only markers/whitespace
    tally: Tally = field(default_factory=Tally)
    marker_severity: dict[str, str] = field(default_factory=dict)


def analyze(records: list[AuditRecord], views: TextViews, files: list[FileInfo], tokenizer: Any = None) -> ArtifactResult:
    res = ArtifactResult()
    scanner = MarkerScanner(tokenizer_specials(tokenizer), tokenizer is not None)
    counts: dict[str, Counter] = defaultdict(Counter)
    t = res.tally
    for r in records:
        conv = r.conv
        if conv is None:
            continue
        if conv.is_text:
            found = scanner.find(conv.text)
            for m in set(found):
                counts[m]["text"] += 1
            sev = {scanner.severity(m) for m in found}
            if ERROR in sev:
                t.hit("special_token_in_text", r.where, None, r.idx)
            elif found:
                t.hit("template_marker_in_text", r.where, None, r.idx)
            if "{{" in conv.text and _PLACEHOLDER.search(conv.text):
                t.hit("placeholder_in_text", r.where, _PLACEHOLDER.search(conv.text).group(), r.idx)
            continue
        sev_seen: set[str] = set()
        placeholder = None
        for k, m in enumerate(conv.messages):
            content = m["content"]
            part = "completion" if m["role"] == "assistant" else "prompt"
            found = scanner.find(content)
            for mk in set(found):
                counts[mk][part] += 1
                sev_seen.add(scanner.severity(mk))
            if placeholder is None and "{{" in content:
                hit = _PLACEHOLDER.search(content)
                placeholder = hit.group() if hit else None
            if content and content != content.strip():
                if m["role"] == "assistant":
                    t.hit("completion_whitespace", r.where, None, r.idx)
                elif m["role"] in ("user", "system"):
                    t.hit("prompt_whitespace", r.where, None, r.idx)
            if m["role"] == "assistant" and content.strip() and not strip_markers(content).strip():
                res.artifact_only.add(r.idx)
        if ERROR in sev_seen:
            t.hit("special_token_in_text", r.where, None, r.idx)
        if WARNING in sev_seen:
            t.hit("template_marker_in_text", r.where, None, r.idx)
        if placeholder:
            t.hit("placeholder_in_text", r.where, placeholder, r.idx)
        if r.idx in res.artifact_only:
            t.hit("artifact_only_completion", r.where, None, r.idx)
        # A completion that starts by repeating the whole prompt: the model learns to echo.
        if views.echo[r.idx]:
            t.hit("completion_repeats_prompt", r.where, None, r.idx)
    # collapse duplicate whitespace hits (several turns of one record count once)
    for code in ("completion_whitespace", "prompt_whitespace"):
        if code in t.ids:
            t.count[code] = len(t.ids[code])
            t.examples[code] = list(dict.fromkeys(t.examples[code]))
    res.marker_counts = {m: dict(c) for m, c in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))}
    res.marker_severity = {m: scanner.severity(m) for m in counts}
    _short_completions(records, views, t)
    _mixed(records, files, t)
    return res


def _short_completions(records: list[AuditRecord], views: TextViews, t: Tally) -> None:
    """Completions far shorter than their task's typical one (< 1/10 of the median, median >= 20 words)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if r.conv is not None and not r.conv.is_text and r.split == "train":
            by_task[r.task or ""].append(r.idx)
    for task, ids in by_task.items():
        if len(ids) < 20:
            continue
        w = views.completion_words[np.asarray(ids)]
        med = float(np.median(w))
        if med < 20:
            continue  # short answers are the norm here (labels, one-liners)
        cut = med / 10
        for i, n in zip(ids, w):
            if n < cut:
                t.hit("short_completion", records[i].where, f"{task}: median {med:.0f} words", i)


def _mixed(records: list[AuditRecord], files: list[FileInfo], t: Tally) -> None:
    by_file: dict[str, list[AuditRecord]] = defaultdict(list)
    for r in records:
        by_file[r.path].append(r)
    for f in files:
        fmts = {k: v for k, v in f.formats.items() if k != "unknown"}
        if len(fmts) > 1:
            main = max(fmts, key=fmts.get)
            for r in by_file[f.path]:
                if isinstance(r.data, dict):
                    own = detect_format(set(r.data))
                    if own is not None and own != main:
                        t.hit("mixed_formats", r.where, f"{f.path}: {', '.join(f'{k} ({v})' for k, v in sorted(fmts.items(), key=lambda kv: -kv[1]))}", r.idx)
        if len(f.field_sets) > 1:
            main_set = f.field_sets.most_common(1)[0][0]
            for r in by_file[f.path]:
                if isinstance(r.data, dict) and tuple(sorted(map(str, r.data))) != main_set:
                    t.hit("mixed_field_sets", r.where, f"{f.path}: most records have {{{', '.join(main_set)}}}", r.idx)


_INFO = {
    "special_token_in_text": (ERROR, "records with special tokens of the model inside their text",
                              "Remove them from the data (e.g. sed 's/<|endoftext|>//g'): the template adds the real end-of-turn token itself."),
    "template_marker_in_text": (WARNING, "records with prompt-format markers of another template in their text",
                                "Strip the leftover markers ([INST], ### Response:, ...): the model would learn to write them."),
    "artifact_only_completion": (ERROR, "records whose completion is only special tokens or markers",
                                 "Drop them (tunelab audit --fix does) or write the real completion."),
    "placeholder_in_text": (WARNING, "records with unfilled {{placeholders}}",
                            "Fill the placeholders (e.g. {{name}} -> your model's name) before training, or the model learns to write them."),
    "completion_repeats_prompt": (WARNING, "records whose completion repeats the prompt",
                                  "Check these: a completion that echoes the prompt teaches the model to repeat instructions."),
    "completion_whitespace": (WARNING, "records with leading or trailing whitespace in a completion",
                              "Strip completions: trained trailing whitespace or newlines become part of every answer."),
    "prompt_whitespace": (INFO, "records with leading or trailing whitespace in a prompt",
                          "Strip prompts so that they match what users type at inference."),
    "short_completion": (INFO, "records whose completion is under a tenth of their task's median length",
                         "Check these for truncated or placeholder answers."),
    "mixed_formats": (WARNING, "records in a different format from most of their file",
                      "Use one format per file."),
    "mixed_field_sets": (INFO, "records whose set of fields differs from most of their file",
                         "Usually harmless (an optional field left out); check that no field is misspelled."),
}


def findings(res: ArtifactResult) -> FindingList:
    out = FindingList()
    t = res.tally
    for code, (sev, what, fix) in _INFO.items():
        n = t.count.get(code, 0)
        if not n:
            continue
        msg = f"{n} {what}"
        if code in ("special_token_in_text", "template_marker_in_text"):
            ms = [(m, c) for m, c in res.marker_counts.items() if res.marker_severity[m] == sev]
            msg += ": " + "; ".join(f"{m} in " + ", ".join(f"{v} {k}s" for k, v in c.items()) for m, c in ms[:6])
        elif t.details.get(code):
            msg += ": " + t.breakdown(code, 4)
        out.add(code, sev, msg, n, t.examples.get(code, []), fix, SECTION)
    return out


def details(res: ArtifactResult) -> dict:
    return {
        "markers": [{"marker": m, "severity": res.marker_severity[m], "records": c} for m, c in res.marker_counts.items()],
        "artifact_only_completions": len(res.artifact_only),
    }
