"""Hugging Face ``datasets`` inputs beside the file readers: a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``{path: dir, split}``), or a hub id
already in the local Hugging Face cache (``{hub: tatsu-lab/alpaca, split: train}``).

Hub ids are read from the cache only, with the hub switched off for the call: training never
waits on the network, and an id that is not cached is one clear error saying how to cache it.
Rows become :class:`~tunelab.data.formats.Record` objects whose location is
``dataset[split] row N`` (N the 0-based row index, as ``ds[N]``), so errors name the dataset and
the row where a file would name a line. From there they take the same path as file records.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from .formats import DataError, Record

INSTALL = "pip install 'tunelab[datasets]'"


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists())


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("data", f"Hugging Face datasets inputs need the datasets package: {INSTALL}") from None
    return datasets


def _pick_split(obj: Any, split: Optional[str], where: str) -> tuple[Any, Optional[str]]:
    """The Dataset for ``split`` of a Dataset or DatasetDict, and the split's name."""
    if not hasattr(obj, "keys"):  # a single Dataset
        if split is not None and str(getattr(obj, "split", None) or split) != split:
            raise DataError(where, f"split {split!r} asked for, but this dataset is the single split {obj.split!r}; drop split:")
        return obj, split or (str(obj.split) if getattr(obj, "split", None) else None)
    names = list(obj.keys())
    if split is None:
        if len(names) == 1:
            split = names[0]
        elif "train" in names:
            split = "train"
        else:
            raise DataError(where, f"the dataset has splits {names}; choose one with split:")
    if split not in names:
        raise DataError(where, f"no split {split!r}; the dataset has {names}")
    return obj[split], split


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the hub off for one call: datasets falls back to its local cache."""
    import datasets.config as dconf
    import huggingface_hub.constants as hconst

    saved = dconf.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE
    dconf.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconf.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def datasets_cache_dir() -> str:
    """Where datasets keeps prepared data: HF_DATASETS_CACHE, else $HF_HOME/datasets (read now,
    not when datasets was imported, so a changed HF_HOME is honoured)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "datasets")
    return str(_datasets().config.HF_DATASETS_CACHE)


def open_hf_dataset(path: Optional[str] = None, hub: Optional[str] = None, split: Optional[str] = None) -> tuple[Any, str]:
    """(Dataset, its name for messages: ``dir[split]`` or ``hub:id[split]``)."""
    ds_lib = _datasets()
    if path is not None:
        where = str(path)
        try:
            obj = ds_lib.load_from_disk(str(path))
        except Exception as e:  # a broken or foreign folder
            raise DataError(where, f"not a dataset written by save_to_disk ({type(e).__name__}: {e})") from None
    else:
        where = f"hub:{hub}"
        cache = datasets_cache_dir()
        try:
            with _hub_offline():
                obj = ds_lib.load_dataset(hub, cache_dir=cache)  # every split: the split is picked below, as for folders
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(where, f"not in the local Hugging Face cache ({cache}); tunelab reads hub datasets from the cache only. "
                                   f"Cache it once where the hub is reachable (python -c \"import datasets; datasets.load_dataset('{hub}')\"), "
                                   f"or save it with save_to_disk and use path: ({type(e).__name__}: {msg})") from None
    ds, split = _pick_split(obj, split, where)
    return ds, f"{where}[{split}]" if split else where


def read_hf_records(path: Optional[str] = None, hub: Optional[str] = None, split: Optional[str] = None) -> tuple[Iterator[Record], str]:
    """(the dataset's rows as Records, the dataset's name)."""
    ds, name = open_hf_dataset(path, hub, split)
    if len(ds) == 0:
        raise DataError(name, "the dataset holds no rows")

    def rows() -> Iterator[Record]:
        for i, row in enumerate(ds):
            yield Record(dict(row), name, i, row=True)

    return rows(), name
