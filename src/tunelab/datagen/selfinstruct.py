"""``tunelab self-instruct``: the self-instruct loop of Wang et al. (2022), "Self-Instruct:
Aligning Language Models with Self-Generated Instructions".

Each round:

1. **Instructions**: ``batch_size`` prompts, each listing ``k`` in-context instructions sampled
   from the seed tasks (``k - machine_k``) and from those generated so far (``machine_k``), ask
   the model to continue the list. The answers are split into instructions.
2. **Filters** (:mod:`.filters`): length, keyword blacklist, heuristics, exact and near
   duplicates, ROUGE-L >= 0.7 against every kept instruction; each rejection is counted.
3. **Classification**: a few-shot prompt from the seeds' own labels asks whether each kept
   instruction is a classification task.
4. **Instances**: output-first for classification (the class label, then an input for it, so
   labels are not all the same), input-first otherwise; an answer without the Input:/Output:
   structure is taken as the output of an instruction that needs no input.
5. **Records** are appended to the output, one JSON line each, flushed and synced, with their
   provenance; the counts go to ``OUT.stats.json`` (atomic).

Resume: a second run with the same ``--out`` reads the records there (seeds and generated),
puts them back into the filter's pool, and goes on from the next round until ``--n``
generated records exist. A torn last line (a kill mid-write) is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..data.formats import DataError
from ..files import atomic_write_json
from .backend import Backend, Sampling
from .filters import InstructionFilter

log = logging.getLogger("tunelab")

INSTRUCTION_STOPS = ("\n16", "16.", "16 .")


@dataclass
class SeedTask:
    id: str
    instruction: str
    instances: list[tuple[str, str]]
    is_classification: bool


@dataclass
class SelfInstructOptions:
    n: int = 100  # generated records to reach (seeds not counted)
    k: int = 8  # in-context instructions per prompt
    machine_k: int = 2  # of which from the generated ones (when there are any)
    batch_size: int = 8  # instruction prompts per round
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.5
    instance_max_tokens: int = 300
    seed: int = 0
    max_idle_rounds: int = 20  # rounds in a row without a kept instruction before giving up


@dataclass
class SelfInstructResult:
    out: Path
    generated: int
    rounds: int
    stats: dict
    new_records: list[dict] = field(default_factory=list)


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Seed tasks: the self-instruct format ({instruction, instances: [{input, output}],
    is_classification}) or Alpaca records ({instruction, input, output})."""
    p = Path(path)
    if not p.exists():
        raise DataError(str(p), "seed task file not found")
    seeds = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(where, f"not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(d, dict) or not isinstance(d.get("instruction"), str) or not d["instruction"].strip():
            raise DataError(where, "a seed task needs a non-empty 'instruction' string")
        if "instances" in d:
            if not isinstance(d["instances"], list) or not all(isinstance(x, dict) and isinstance(x.get("output"), str) for x in d["instances"]):
                raise DataError(where, "'instances' must be a list of {input, output} strings")
            inst = [(str(x.get("input") or ""), x["output"]) for x in d["instances"]]
        elif isinstance(d.get("output"), str):
            inst = [(str(d.get("input") or ""), d["output"])]
        else:
            raise DataError(where, "a seed task needs 'instances' [{input, output}] or an 'output'")
        seeds.append(SeedTask(str(d.get("id") or f"seed_{i}"), d["instruction"].strip(), inst, bool(d.get("is_classification", False))))
    if not seeds:
        raise DataError(str(p), "no seed tasks in the file")
    return seeds


# --------------------------------------------------------------------------- prompts and parsing

def instruction_prompt(instructions: list[str]) -> str:
    """The reference's prompt: a numbered list of tasks for the model to continue."""
    out = "Come up with a series of tasks:\n"
    for i, ins in enumerate(instructions, 1):
        one_line = " ".join(ins.split()).rstrip(":")
        out += f"{i}. {one_line}\n"
    return out + f"{len(instructions) + 1}."


def parse_instructions(response: str) -> list[str]:
    """The instructions in an answer: numbered items ("9. ...", "10) ..."), the unnumbered first
    line continuing the prompt's last number."""
    out = []
    for k, part in enumerate(re.split(r"(?:^|\n)\s*\d+\s*[.)]\s*", response)):
        part = re.sub(r"\s+", " ", part).strip()
        if part and not (k == 0 and part.lower().startswith(("here are", "sure"))):
            out.append(part)
    return out


def classification_prompt(seeds: list[SeedTask], instruction: str, rng: random.Random, shots: int = 8) -> str:
    yes = [s for s in seeds if s.is_classification]
    no = [s for s in seeds if not s.is_classification]
    picked = rng.sample(yes, min(shots // 2, len(yes))) + rng.sample(no, min(shots - shots // 2, len(no)))
    rng.shuffle(picked)
    text = "Can the following task be regarded as a classification task with finite output labels?\n\n"
    for s in picked:
        text += f"Task: {s.instruction}\nIs it classification? {'Yes' if s.is_classification else 'No'}\n\n"
    return text + f"Task: {instruction}\nIs it classification?"


def parse_yes_no(response: str) -> bool:
    m = re.search(r"\b(yes|no)\b", response, re.IGNORECASE)
    return bool(m) and m.group(1).lower() == "yes"


def instance_prompt(seeds: list[SeedTask], instruction: str, classification: bool, rng: random.Random, shots: int = 3) -> str:
    pool = [s for s in seeds if s.is_classification == classification] or seeds
    picked = rng.sample(pool, min(shots, len(pool)))
    if classification:  # output-first: the label, then an input for it
        text = ("Given the classification task definition and the class labels, generate an input that corresponds to each of the "
                "class labels. If the task doesn't require input, just generate possible class labels.\n\n")
        for s in picked:
            inp, outp = s.instances[0]
            text += f"Task: {s.instruction}\nClass label: {outp}\n" + (f"Input: {inp}\n" if inp else "") + "\n"
    else:  # input-first
        text = ("Come up with examples for the following tasks. Try to generate multiple examples when possible. If the task "
                "doesn't require additional input, you can generate the output directly.\n\n")
        for s in picked:
            inp, outp = s.instances[0]
            text += f"Task: {s.instruction}\n" + (f"Input: {inp}\n" if inp else "") + f"Output: {outp}\n\n"
    return text + f"Task: {instruction}\n"


def _field(text: str, name: str, others: tuple[str, ...]) -> Optional[str]:
    m = re.search(rf"(?im)^\s*{name}\s*:\s*", text)
    if not m:
        return None
    rest = text[m.end():]
    ends = [e.start() for o in others for e in [re.search(rf"(?im)^\s*(?:{o})\s*:", rest)] if e]
    ends += [e.start() for e in [re.search(r"(?im)^\s*(?:Task|Example \d+)\s*:?\s*$|^\s*Task\s*:", rest)] if e]
    return rest[: min(ends)].strip() if ends else rest.strip()


def parse_instance(response: str, classification: bool) -> tuple[str, str]:
    """(input, output) of the first instance in an answer."""
    if classification:
        label = _field(response, "Class label", ("Input",))
        inp = _field(response, "Input", ("Class label",))
        if label is not None:
            return inp or "", label
    else:
        inp = _field(response, "Input", ("Output",))
        outp = _field(response, "Output", ("Input",))
        if outp is not None:
            return inp or "", outp
    return "", response.strip()


# --------------------------------------------------------------------------- the output file

def read_existing(out: Path) -> list[dict]:
    """The records already in ``out``; a torn last line is cut off."""
    if not out.exists():
        return []
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    rows, good = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, unfinished: a kill mid-write
                log.warning("%s: dropping an unfinished last line (%d bytes) from an interrupted run", out, len(line))
                with open(out, "r+b") as f:
                    f.truncate(good)
                break
            raise DataError(f"{out}:{i + 1}", "not valid JSON; this file is not a self-instruct output (pick a new --out)") from None
        good += len(line) + 1
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("provenance"), dict) and "instruction" in r):
            raise DataError(f"{out}:{i + 1}", "no 'provenance': this file was not written by tunelab self-instruct (pick a new --out)")
    return rows


class _Appender:
    """Appends JSON lines, each flushed and fsynced, so a kill loses at most the line in flight."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def stats_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json")


# --------------------------------------------------------------------------- the loop

def self_instruct(seed_file: str | Path, out: str | Path, backend: Backend, opts: SelfInstructOptions,
                  progress: Optional[Callable[[str], None]] = None) -> SelfInstructResult:
    out = Path(out)
    seeds = load_seed_tasks(seed_file)
    existing = read_existing(out)
    filt = InstructionFilter()
    generated: list[str] = []
    rounds = 0
    for r in existing:
        prov = r["provenance"]
        filt.add(r["instruction"])
        if prov.get("source") == "generated":
            generated.append(r["instruction"])
            rounds = max(rounds, int(prov.get("round", 0)))
    prior: dict = {}
    sp = stats_path(out)
    if existing and sp.exists():
        try:
            prior = json.loads(sp.read_text())
        except (OSError, json.JSONDecodeError):
            prior = {}
    filt.rejected.update(prior.get("rejected", {}))
    filt.kept = max(len(generated), int(prior.get("kept", 0)))
    extra: dict[str, int] = dict(prior.get("instances", {}))
    appender = _Appender(out)
    new_records: list[dict] = []
    say = progress or (lambda s: None)

    class Ticker:
        """Progress inside a round (a slow model takes minutes per step): a line every 10 s."""

        def __init__(self) -> None:
            self.last = time.perf_counter()

        def __call__(self, what: str, total: int) -> Callable[[], None]:
            done = [0]

            def tick() -> None:
                done[0] += 1
                now = time.perf_counter()
                if now - self.last >= 10 or done[0] == total:
                    self.last = now
                    say(f"self-instruct round {rounds}: {what} {done[0]}/{total}")
            return tick

    tick = Ticker()
    try:
        if not existing:
            for s in seeds:
                filt.add(s.instruction)
                for inp, outp in s.instances:
                    appender.write({"instruction": s.instruction, "input": inp, "output": outp, "id": s.id,
                                    "provenance": {"source": "seed", "round": 0, "model": None, "is_classification": s.is_classification}})
        elif len(generated) >= opts.n:
            say(f"self-instruct: {out} already holds {len(generated)} generated records (--n {opts.n}); nothing to do")
        idle = 0
        started = time.perf_counter()
        while len(generated) < opts.n:
            rounds += 1
            rng = random.Random(f"{opts.seed}:{rounds}")  # a resumed run draws what the uninterrupted one would have
            prompts = []
            for _ in range(opts.batch_size):
                mk = min(opts.machine_k, len(generated))
                ctx = rng.sample([s.instruction for s in seeds], min(opts.k - mk, len(seeds))) + rng.sample(generated, mk)
                rng.shuffle(ctx)
                prompts.append([{"role": "user", "content": instruction_prompt(ctx)}])
            answers = backend.complete(prompts, Sampling(opts.max_tokens, opts.temperature, opts.top_p, INSTRUCTION_STOPS),
                                       tick("instruction prompts", len(prompts)))
            kept: list[str] = []
            for a in answers:
                for ins in parse_instructions(a):
                    if len(generated) + len(kept) >= opts.n:
                        break
                    if filt.offer(ins):
                        kept.append(" ".join(ins.split()))
            if kept:
                idle = 0
                cls_answers = backend.complete([[{"role": "user", "content": classification_prompt(seeds, k, rng)}] for k in kept],
                                               Sampling(8, 0.0, 1.0), tick("classification", len(kept)))
                is_cls = [parse_yes_no(a) for a in cls_answers]
                inst_answers = backend.complete([[{"role": "user", "content": instance_prompt(seeds, k, c, rng)}] for k, c in zip(kept, is_cls)],
                                                Sampling(opts.instance_max_tokens, 0.0, 1.0, ("\nTask:", "Task:")),
                                                tick("instances", len(kept)))
                for ins, c, a in zip(kept, is_cls, inst_answers):
                    inp, outp = parse_instance(a, c)
                    if not outp.strip():
                        extra["no_output"] = extra.get("no_output", 0) + 1
                        continue
                    rec = {"instruction": ins, "input": inp, "output": outp, "id": f"gen-{rounds:04d}-{len(generated):05d}",
                           "provenance": {"source": "generated", "round": rounds, "model": backend.name, "is_classification": c}}
                    appender.write(rec)
                    new_records.append(rec)
                    generated.append(ins)
            else:
                idle += 1
                if idle >= opts.max_idle_rounds:
                    raise DataError(str(out), f"no instruction passed the filters in {idle} rounds in a row ({_stats(filt, extra)}); "
                                              "the model may be too weak or too repetitive: try a larger model or a higher temperature")
            atomic_write_json(sp, _stats_dict(filt, extra, len(generated), rounds, backend.name))
            rate = len(new_records) / max(time.perf_counter() - started, 1e-9)
            say(f"self-instruct round {rounds}: {len(generated)}/{opts.n} generated (+{len(kept)} kept this round, "
                f"{rate * 60:.1f} records/min); {_stats(filt, extra)}")
    finally:
        appender.close()
    stats = _stats_dict(filt, extra, len(generated), rounds, backend.name)
    atomic_write_json(sp, stats)
    return SelfInstructResult(out, len(generated), rounds, stats, new_records)


def _stats_dict(filt: InstructionFilter, extra: dict, generated: int, rounds: int, model: str) -> dict:
    s = filt.stats()
    return {"generated": generated, "rounds": rounds, "model": model, "kept": s["kept"], "rejected": s["rejected"], "instances": dict(extra)}


def _stats(filt: InstructionFilter, extra: dict) -> str:
    rej = filt.stats()["rejected"]
    parts = [f"{k} {v}" for k, v in rej.items()] + [f"{k} {v}" for k, v in extra.items()]
    return "rejected: " + (", ".join(parts) if parts else "none")
