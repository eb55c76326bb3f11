"""``run_audit``: read the files, run every check, assemble the report."""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import DataConfig
from ..data.formats import DataError, not_a_file_message
from . import artifacts, balance, dedup, lengths, neardup, schema
from .findings import Tally
from .normalize import build_views
from .reader import AuditRecord, FileInfo, Issue, read_file
from .report import AuditReport


@dataclass
class DataSource:
    """One file to audit: its path, split, declared format and default task name."""

    path: str
    split: str = "train"
    format: str = "auto"
    name: Optional[str] = None


@dataclass
class AuditOptions:
    near_dup_threshold: float = 0.8  # Jaccard over word shingles
    shingle_size: int = 1  # words per shingle (see neardup.py for why 1)
    num_perm: int = 128  # MinHash permutations
    boilerplate_df: Optional[float] = 0.9  # per file, words in at least this share of records are a template: not shingled
    lsh_index: str = "numpy"  # "numpy" (vectorised banding) or "datasketch" (MinHashLSH): the same buckets
    near_dups: bool = True
    imbalance_threshold: float = 10.0  # warn when max/min class count exceeds this
    label_max_distinct: int = 50  # completions count as labels when a task has at most this many distinct ones...
    label_min_records: int = 200  # ...over at least this many records
    max_seq_len: Optional[int] = 1024
    # data.truncation of the run the data is for (drop | truncate_prompt): the length findings say
    # what training will do; None: the neutral right-truncation model (what cutting at max_seq_len does)
    truncation: Optional[str] = None
    length_sample: Optional[int] = 10000  # tokenize a sample of this many (+ every record that may not fit); None: all
    sample: int = 100  # spot-check records
    spot_check_path: Optional[str] = None  # None: no spot-check file
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _as_source(x: Any, split: str) -> DataSource:
    if isinstance(x, DataSource):
        return x if x.split == split else DataSource(x.path, split, x.format, x.name)
    if hasattr(x, "path") and hasattr(x, "format"):  # a config DatasetEntry
        return DataSource(str(x.path), split, getattr(x, "format", "auto") or "auto", getattr(x, "name", None))
    return DataSource(str(x), split)


def load_renderer(model: str, template: str = "auto", trust_remote_code: bool = False, train_on: str = DataConfig.train_on) -> tuple[Any, dict]:
    """(Renderer, info) for a model's tokenizer; (None, info with the reason) when it cannot load,
    so that the audit can fall back to word counts and say so."""
    from ..data.render import Renderer

    try:
        tok = _tokenizer(model, trust_remote_code)
        r = Renderer(tok, template, train_on)
    except Exception as e:  # any failure: missing package, hub unreachable, no chat template
        return None, {"model": model, "template": template, "unit": "words", "error": f"{type(e).__name__}: {e}"}
    return r, renderer_info(r, model)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, trust_remote_code: bool) -> Any:
    """Loaded once per process (loading takes seconds; the CLI tests audit many times)."""
    from ..models.load import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(model), trust_remote_code)


def renderer_info(renderer: Any, model: Optional[str] = None) -> dict:
    tok = renderer.tokenizer
    return {"model": model or getattr(tok, "name_or_path", None), "template": renderer.template_name, "unit": "tokens",
            "eos_token": getattr(tok, "eos_token", None)}


def run_audit(data: Sequence[Any], eval_data: Sequence[Any] = (), *, renderer: Any = None, options: Optional[AuditOptions] = None,
              tokenizer_info: Optional[dict] = None, eval_where: Optional[set[str]] = None) -> AuditReport:
    """Audit ``data`` (train files) and ``eval_data`` (eval files).

    ``data``/``eval_data``: paths, :class:`DataSource` or config ``DatasetEntry`` objects.
    ``renderer``: a ``tunelab.data.render.Renderer`` for token lengths of the rendered
    template (None: word counts). ``eval_where``: ``file:line`` ids of train-file records that
    training holds out for eval (``data.eval_fraction``), audited as eval for leakage.
    Raises DataError when a file does not exist (nothing to audit is a usage error).
    """
    opts = options or AuditOptions()
    sources = [_as_source(x, "train") for x in data] + [_as_source(x, "eval") for x in eval_data]
    if not sources:
        raise DataError("audit", "no data files to audit; give DATA paths or --config with data.train")
    for s in sources:
        if not Path(s.path).is_file():
            raise DataError(s.path, not_a_file_message(Path(s.path)))
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    # 1. read + schema
    records: list[AuditRecord] = []
    files: list[FileInfo] = []
    issues: list[Issue] = []
    tally = Tally()
    for s in sources:
        info, recs = read_file(s.path, s.split, s.format, s.name, len(records), issues)
        schema.check_and_convert(recs, info, tally)
        if eval_where:
            for r in recs:
                if r.where in eval_where:
                    r.split = "eval"
        records += recs
        files.append(info)
    schema.issues_to_tally(issues, tally)
    found = schema.findings(tally)
    lap("read_and_schema")

    # Token counting is mostly the tokenizer's Rust code, which releases the GIL: the texts
    # are prepared here and tokenized in a thread while the checks below run in this one.
    token_job = None
    if renderer is not None:
        from .tokens import TokenJob

        token_job = TokenJob(records, renderer, opts.max_seq_len, seed=opts.seed, sample_size=opts.length_sample)
        lap("tokens_prepare")

    # 2. normalized views, exact duplicates, conflicts
    views = build_views(records)
    lap("normalize")
    dups = dedup.find_duplicates(records, views)
    found += dedup.findings(dups, records)
    lap("exact_duplicates")

    # 3. near-duplicates and leakage
    near = None
    if opts.near_dups:
        near = neardup.find_near_duplicates(records, views, opts.near_dup_threshold, opts.shingle_size, opts.num_perm, seed=1,
                                             boilerplate_df=opts.boilerplate_df, index=opts.lsh_index)
        found += neardup.findings(near, records)
    found += dedup.leakage_finding(dups.leaks, near.leaks if near else [], records)
    lap("near_duplicates")

    # 4. balance, 5. artifacts
    bal = balance.analyze(records, views, opts.imbalance_threshold, opts.label_max_distinct, opts.label_min_records)
    found += balance.findings(bal)
    lap("balance")
    tok = renderer.tokenizer if renderer is not None else None
    art = artifacts.analyze(records, views, files, tok)
    found += artifacts.findings(art)
    lap("artifacts")

    # 6. lengths in tokens of the rendered template
    if token_job is not None:
        tc = token_job.result()  # this stage's time is the wait for the tokenizer thread
        timings["tokens_elapsed"] = tc.seconds
    else:
        tc = lengths.word_counts(records, views, opts.max_seq_len)
        if tokenizer_info and tokenizer_info.get("error"):
            tc.note += f" ({tokenizer_info['error'][:200]})"
    lst = lengths.stats(tc, records)
    lst.truncation = opts.truncation
    found += lengths.findings(lst, records, tc, opts.truncation)
    lap("lengths")

    # 7. spot check
    spot = None
    if opts.spot_check_path and opts.sample > 0:
        from .spotcheck import write_spot_check

        spot = write_spot_check(opts.spot_check_path, records, opts.sample, opts.seed, renderer, bal.label_of)
        lap("spot_check")

    leaked = {e for e, _, _ in dups.leaks} | ({e for e, _, _ in near.leaks} if near else set())
    sections = {
        "schema": {"problems": {c: n for c, n in tally.count.items() if n}},
        "duplicates": dedup.details(dups, records),
        "near_duplicates": neardup.details(near, records) if near else {"skipped": True},
        "leakage": {"eval_records_leaked": len(leaked), "pairs": dedup.leakage_details(dups.leaks, near.leaks if near else [], records)},
        "balance": balance.details(bal),
        "lengths": lst.to_dict(records),
        "artifacts": artifacts.details(art),
        "spot_check": spot,
    }
    settings = opts.to_dict()
    settings["data"] = [{"path": s.path, "split": s.split, "format": s.format, "name": s.name} for s in sources]
    timings["total"] = round(sum(v for k, v in timings.items() if k != "tokens_elapsed"), 3)
    info = tokenizer_info or (renderer_info(renderer) if renderer is not None else {"unit": "words"})
    return AuditReport(settings, info, files, list(found), sections, timings, records,
                       {"tally": tally, "issues": issues, "dups": dups, "near": near, "balance": bal, "artifacts": art, "lengths": lst})

