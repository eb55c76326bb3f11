"""``tunelab augment DATA --paraphrase N | --back-translate LANG --out OUT.jsonl``.

Each record's prompt is rewritten (N paraphrases, or a round trip through LANG) and its
completion kept as it is. The output holds every original record, given an ``id`` when it had
none (``rec-`` + a hash of its content, so the same record always gets the same id), followed
by the copies, each with ``augmented_from: <that id>`` and ``augmentation: {method, model,
lang?}``. The split (``data.mixing.stratified_split``) and the audit's leakage check read
``augmented_from``, so a copy never sits on the other side of a train/eval split from its
original (docs/practices.md#augmentation-leakage).

What is rewritten: the instruction of alpaca and dolly records (the input/context stays, the
completion answers it), ``inputs``/``prompt`` of flan records, the last user turn of messages
and sharegpt records. Text records have no prompt and are copied unchanged.

Back-translation first checks that the model can translate at all: a probe sentence goes to
LANG and back; if the forward text is still the source or the round trip lost it, the command
stops with an error naming the model, instead of writing noise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..audit.normalize import normalize
from ..data.formats import DataError, detect_format, read_records
from ..files import atomic_write_jsonl
from .backend import Backend, Sampling
from .rouge import rouge_l, tokens

LANGS = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "ru": "Russian",
         "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "pl": "Polish", "tr": "Turkish",
         "sv": "Swedish", "cs": "Czech", "en": "English"}
PROBE = "The weather is cold today, so I will wear my warm coat when I walk to the station."


@dataclass
class AugmentResult:
    out: Path
    originals: int
    augmented: int
    counts: Counter = field(default_factory=Counter)


def record_id(d: dict) -> str:
    if isinstance(d.get("id"), (str, int)) and not isinstance(d.get("id"), bool) and str(d["id"]):
        return str(d["id"])
    return "rec-" + hashlib.sha1(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def _prompt_slot(d: dict, fmt: str) -> Optional[tuple[list, object]]:
    """(container, key) of the text to rewrite, or None (nothing to rewrite)."""
    if fmt in ("alpaca", "dolly"):
        return [d], "instruction"
    if fmt == "flan":
        return [d], "inputs" if "inputs" in d else "prompt"
    turns = d.get("messages") if fmt == "messages" else d.get("conversations")
    role_key, text_key, user = ("role", "content", ("user",)) if fmt == "messages" else ("from", "value", ("human", "user"))
    if not isinstance(turns, list):
        return None
    last_asst = max((i for i, t in enumerate(turns) if isinstance(t, dict) and str(t.get(role_key, "")).lower() not in user + ("system",)), default=None)
    for i in range(len(turns) - 1 if last_asst is None else last_asst, -1, -1):
        t = turns[i]
        if isinstance(t, dict) and str(t.get(role_key, "")).lower() in user and isinstance(t.get(text_key), str):
            return [t], text_key
    return None


def _clean(text: str) -> str:
    text = text.strip()
    text = re.sub(r"(?i)^(here is|here's|sure[,!]?)[^:\n]*:\s*", "", text)
    text = re.sub(r"(?i)^(rewritten|paraphrased|translated|translation)?\s*(instruction|text|version|sentence)?\s*:\s*", "", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text.strip()


def paraphrase_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": "Rewrite the following instruction so that it asks for exactly the same thing in different words. "
                                        f"Reply with the rewritten instruction only.\n\nInstruction: {text}"}]


def translate_prompt(text: str, lang: str) -> list[dict]:
    return [{"role": "user", "content": f"Translate the following text into {lang}. Reply with the translation only.\n\n{text}"}]


def lang_name(lang: str) -> str:
    return LANGS.get(lang.lower(), lang)


def check_translation(backend: Backend, lang: str) -> None:
    """Stop with a clear error when ``backend`` cannot translate to ``lang`` and back."""
    name = lang_name(lang)
    greedy = Sampling(96, 0.0, 1.0)
    fwd = _clean(backend.complete([translate_prompt(PROBE, name)], greedy)[0])
    back = _clean(backend.complete([translate_prompt(fwd, "English")], greedy)[0]) if fwd else ""
    src = tokens(PROBE)
    same = rouge_l(src, tokens(fwd))
    kept = rouge_l(src, tokens(back))
    if not fwd or same >= 0.6 or kept < 0.4:
        why = ("it answered nothing" if not fwd else "its 'translation' is the English source" if same >= 0.6
               else f"the round trip kept little of the source (ROUGE-L {kept:.2f} < 0.40)")
        raise DataError("augment --back-translate", f"model {backend.name!r} cannot translate to {name} and back: {why} "
                        f"(probe {PROBE!r} -> {fwd[:80]!r} -> {back[:80]!r}). Use a translation-capable model: --model RUN_OR_MODEL "
                        "or --base-url URL --model-name NAME")


def augment(data: str | Path, out: str | Path, backend: Backend, paraphrase: int = 0, back_translate: Optional[str] = None,
            temperature: float = 0.9, max_tokens: int = 256, max_attempts: int = 3,
            progress: Optional[Callable[[str], None]] = None) -> AugmentResult:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; augment never overwrites a file, pick a new --out")
    if out.suffix.lower() != ".jsonl":
        raise DataError(str(out), "--out must be a .jsonl file")
    if not paraphrase and not back_translate:
        raise DataError("augment", "nothing to do: give --paraphrase N and/or --back-translate LANG")
    say = progress or (lambda s: None)
    langs = [x.strip() for x in (back_translate or "").split(",") if x.strip()]
    for lang in langs:
        check_translation(backend, lang)
    originals: list[dict] = []
    slots: list[Optional[str]] = []  # the prompt text of each original, None: nothing to rewrite
    for rec in read_records(data):
        d = rec.data
        fmt = detect_format(set(d)) if isinstance(d, dict) else None
        if fmt is None:
            raise DataError(rec.where, "not a record of a supported format (alpaca, dolly, flan, sharegpt, messages, text)")
        d = dict(d)
        d["id"] = record_id(d)
        slot = _prompt_slot(d, fmt) if fmt != "text" else None
        text = slot[0][0][slot[1]] if slot else None
        originals.append(d)
        slots.append(text if isinstance(text, str) and text.strip() else None)
    counts: Counter = Counter()
    counts["not_augmentable"] = sum(1 for s in slots if s is None)
    todo = [i for i, s in enumerate(slots) if s is not None]
    found: dict[int, list[tuple[str, dict]]] = {i: [] for i in todo}  # original -> [(new prompt, augmentation info)]

    if paraphrase:
        seen = {i: {normalize(slots[i])} for i in todo}
        want = {i: paraphrase for i in todo}
        s = Sampling(max_tokens, temperature, 0.95)
        for attempt in range(max_attempts):
            jobs = [i for i in todo for _ in range(want[i])]
            if not jobs:
                break
            answers = backend.complete([paraphrase_prompt(slots[i]) for i in jobs], s)
            for i, a in zip(jobs, answers):
                a = _clean(a)
                key = normalize(a)
                if not key:
                    counts["empty_answer"] += 1
                elif key in seen[i]:
                    counts["same_as_original" if key == normalize(slots[i]) else "repeated_paraphrase"] += 1
                elif want[i] > 0:
                    seen[i].add(key)
                    want[i] -= 1
                    found[i].append((a, {"method": "paraphrase", "model": backend.name}))
            say(f"augment: paraphrase pass {attempt + 1}: {sum(paraphrase - want[i] for i in todo)}/{paraphrase * len(todo)} written")
        counts["paraphrase_missing"] = sum(want.values())
    for lang in langs:
        name = lang_name(lang)
        greedy = Sampling(max_tokens, 0.0, 1.0)
        fwd = [_clean(a) for a in backend.complete([translate_prompt(slots[i], name) for i in todo], greedy)]
        back = [_clean(a) for a in backend.complete([translate_prompt(f, "English") for f in fwd], greedy)]
        for i, b in zip(todo, back):
            if not normalize(b) or normalize(b) == normalize(slots[i]):
                counts["back_translation_unchanged" if normalize(b) else "empty_answer"] += 1
                continue
            found[i].append((b, {"method": "back-translation", "lang": lang, "model": backend.name}))
        say(f"augment: back-translation via {name}: {len(todo)} records")

    rows: list[dict] = list(originals)
    n_aug = 0
    for i in todo:
        for k, (text, info) in enumerate(found[i]):
            c = copy.deepcopy(originals[i])
            container, key = _prompt_slot(c, detect_format(set(c)))
            container[0][key] = text
            tag = "para" if info["method"] == "paraphrase" else f"bt-{info['lang']}"
            c["id"] = f"{originals[i]['id']}-{tag}{k}"
            c["augmented_from"] = originals[i]["id"]
            c["augmentation"] = info
            rows.append(c)
            n_aug += 1
    atomic_write_jsonl(out, rows)
    counts["augmented"] = n_aug
    return AugmentResult(out, len(originals), n_aug, counts)
