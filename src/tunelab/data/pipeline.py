"""From the data config to encoded train and eval examples: read, split, mix, render."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import Config, DatasetEntry
from .formats import Conversation, DataError, convert_records, load_dataset_file
from .hf_datasets import is_saved_dataset, read_hf_records
from .mixing import mix, stratified_split
from .render import EncodedExample, EncodeStats, Renderer


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


def prepare_conversations(cfg: Config) -> tuple[list[Conversation], list[Conversation], dict[str, str], list[str]]:
    if not cfg.data.train:
        raise DataError("data.train", "no training datasets; add data.train: [{path: ...}] to the config")
    formats: dict[str, str] = {}
    skipped: list[str] = []
    parts: list[tuple[list[Conversation], float]] = []
    evals: list[Conversation] = []
    for k, entry in enumerate(cfg.data.train):
        convs, fmt, bad = load_conversations(entry, cfg.data.on_error)
        formats[entry.source] = fmt
        skipped += bad
        if cfg.data.eval is None and cfg.data.eval_fraction > 0:
            convs, ev = stratified_split(convs, cfg.data.eval_fraction, cfg.train.seed + k)
            evals += ev
        parts.append((convs, entry.weight))
    train = mix(parts, cfg.train.seed)
    if cfg.data.eval is not None:
        evals, fmt, bad = load_conversations(cfg.data.eval, cfg.data.on_error)
        formats[cfg.data.eval.source] = fmt
        skipped += bad
    return train, evals, formats, skipped


def prepare_data(cfg: Config, renderer: Renderer) -> PreparedData:
    d = cfg.data
    if renderer.train_on != d.train_on:
        raise ValueError(f"the renderer trains on {renderer.train_on!r} but data.train_on is {d.train_on!r}; use Renderer.from_config")
    train_c, eval_c, formats, skipped = prepare_conversations(cfg)
    train, tstats = renderer.encode_many(train_c, d.max_seq_len, d.truncation)
    if not train:
        raise DataError("data.train", f"no trainable examples left ({tstats.summary()}); raise data.max_seq_len or use truncation: truncate_prompt")
    ev, estats = (renderer.encode_many(eval_c, d.max_seq_len, d.truncation) if eval_c else ([], None))
    return PreparedData(train, ev, tstats, estats, formats, skipped, train_c, eval_c)
