"""From the data config to encoded train and eval examples: read, split, mix, render.

With no ``data.eval``, an eval set is held out by default: 5% of the training records, at
least 16 and at most 500, seeded and stratified by task (``mixing.stratified_split``); data
with fewer than 40 records keeps everything for training. ``data.eval_fraction`` sets another
share, and 0 turns the split off. :attr:`PreparedData.eval_note` says in one line what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import Config, DatasetEntry
from .formats import Conversation, DataError, convert_records, load_dataset_file
from .hf_datasets import is_saved_dataset, read_hf_records
from .mixing import mix, stratified_split
from .render import EncodedExample, EncodeStats, Renderer
from .replay import ReplayStats, replay_examples

DEFAULT_EVAL_FRACTION = 0.05
MIN_EVAL, MAX_EVAL = 16, 500  # default split: at least / at most this many eval records
MIN_RECORDS_FOR_SPLIT = 40  # fewer training records: no default split, everything trains


@dataclass
class PreparedData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    train_stats: EncodeStats
    eval_stats: Optional[EncodeStats]
    formats: dict[str, str] = field(default_factory=dict)  # path -> detected format
    skipped: list[str] = field(default_factory=list)  # bad records skipped (on_error=skip)
    train_conversations: list[Conversation] = field(default_factory=list)
    eval_conversations: list[Conversation] = field(default_factory=list)
    eval_note: str = ""  # one line: where the eval set comes from, or why there is none
    replay: Optional[ReplayStats] = None


def load_conversations(entry: DatasetEntry, on_error: str) -> tuple[list[Conversation], str, list[str]]:
    if entry.hub or is_saved_dataset(entry.path):  # a Hugging Face dataset: cached hub id or save_to_disk folder
        records, name = read_hf_records(entry.path if not entry.hub else None, entry.hub, entry.split)
        task = entry.name or (entry.hub.split("/")[-1] if entry.hub else Path(entry.path).name)
        ds = convert_records(records, name, entry.format, on_error, task, entry.columns)
    else:
        if entry.split:
            raise DataError(entry.path, "split: applies to save_to_disk folders and hub datasets, not to files; remove it")
        ds = load_dataset_file(entry.path, entry.format, on_error, task=entry.name, columns=entry.columns)
    return ds.conversations, ds.format, ds.skipped


def split_plan(n_records: int, eval_fraction: Optional[float]) -> tuple[float, str]:
    """(fraction of each training file to hold out, the note saying so, {n} for the count)."""
    if eval_fraction == 0:
        return 0.0, "eval: data.eval_fraction is 0, so there is no eval set: early stopping is off and the last step is the result"
    if eval_fraction is not None:
        return eval_fraction, f"eval: {{n}} of {n_records} training records held out (data.eval_fraction {eval_fraction:g}, seeded, stratified by task)"
    if n_records < MIN_RECORDS_FOR_SPLIT:
        return 0.0, (f"eval: none: {n_records} training records are fewer than {MIN_RECORDS_FOR_SPLIT}, too few to hold out an eval set, "
                     "so all of them train and early stopping is off (give data.eval to evaluate)")
    n_eval = min(MAX_EVAL, max(MIN_EVAL, round(DEFAULT_EVAL_FRACTION * n_records)))
    return n_eval / n_records, (f"eval: no data.eval, so {{n}} of {n_records} training records are held out "
                                f"({100 * DEFAULT_EVAL_FRACTION:g}%, at least {MIN_EVAL}, at most {MAX_EVAL}; seeded, stratified by task) "
                                "for the eval loss and early stopping; data.eval_fraction: 0 turns this off")


def _prepare(cfg: Config) -> tuple[list[Conversation], list[Conversation], dict[str, str], list[str], str]:
    if not cfg.data.train:
        raise DataError("data.train", "no training datasets; add data.train: [{path: ...}] to the config")
    formats: dict[str, str] = {}
    skipped: list[str] = []
    loaded: list[list[Conversation]] = []
    for entry in cfg.data.train:
        convs, fmt, bad = load_conversations(entry, cfg.data.on_error)
        formats[entry.source] = fmt
        skipped += bad
        loaded.append(convs)
    fraction, note = (0.0, "") if cfg.data.eval is not None else split_plan(sum(map(len, loaded)), cfg.data.eval_fraction)
    parts: list[tuple[list[Conversation], float]] = []
    evals: list[Conversation] = []
    for k, (entry, convs) in enumerate(zip(cfg.data.train, loaded)):
        if fraction > 0:
            convs, ev = stratified_split(convs, fraction, cfg.train.seed + k)
            evals += ev
        parts.append((convs, entry.weight))
    train = mix(parts, cfg.train.seed)
    if cfg.data.eval is not None:
        evals, fmt, bad = load_conversations(cfg.data.eval, cfg.data.on_error)
        formats[cfg.data.eval.source] = fmt
        skipped += bad
        note = f"eval: {cfg.data.eval.path} ({len(evals)} records)"
    return train, evals, formats, skipped, note.replace("{n}", str(len(evals)))


def prepare_conversations(cfg: Config) -> tuple[list[Conversation], list[Conversation], dict[str, str], list[str]]:
    return _prepare(cfg)[:4]


def prepare_data(cfg: Config, renderer: Renderer) -> PreparedData:
    d = cfg.data
    if renderer.train_on != d.train_on:
        raise ValueError(f"the renderer trains on {renderer.train_on!r} but data.train_on is {d.train_on!r}; use Renderer.from_config")
    train_c, eval_c, formats, skipped, note = _prepare(cfg)
    train, tstats = renderer.encode_many(train_c, d.max_seq_len, d.truncation)
    if not train:
        raise DataError("data.train", f"no trainable examples left ({tstats.summary()}); raise data.max_seq_len or use truncation: truncate_prompt")
    ev, estats = (renderer.encode_many(eval_c, d.max_seq_len, d.truncation) if eval_c else ([], None))
    replay = None
    if d.replay is not None:
        extra, replay = replay_examples(d.replay, renderer, train, d.max_seq_len, cfg.train.seed, d.on_error)
        train = train + extra
    return PreparedData(train, ev, tstats, estats, formats, skipped, train_c, eval_c, note, replay)
