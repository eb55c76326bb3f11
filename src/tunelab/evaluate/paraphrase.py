"""The memorization (paraphrase) gap: exact match on the training phrasing of a record against
the same record phrased differently (docs/practices.md#overfit-paraphrase).

A paraphrase file holds the run's training records with other prompts (and completions of the
same meaning, possibly other words: T0's templates of one task, ``../shared/data/t0``, answer
``Positive`` under one template and ``increase`` under another). Records are paired by
position: record k of the file with record k of the run's training files, read in order
before the eval split, so the two files must hold the same number of records. Only pairs whose
training record was trained on (not held out) count. The gap is exact match on the training
phrasing minus exact match on the paraphrase; the records right on the first and wrong on
the second are named.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

from ..data.formats import Conversation, DataError, load_dataset_file
from ..infer.generate import Loaded
from .core import Item, clean, score


def _item(c: Conversation) -> Item:
    return Item(c.messages[:-1], [clean(c.messages[-1]["content"])], [c.source], [c])


def paraphrase_gap(loaded: Loaded, originals: Sequence[Conversation], trained_sources: set[str], path: str, max_n: int = 200,
                   seed: int = 0, batch_size: int = 16, max_new_tokens: int = 32,
                   on_batch: Optional[Callable[[int], None]] = None) -> dict:
    para = load_dataset_file(path).conversations
    if len(para) != len(originals):
        raise DataError(path, f"{len(para)} records, but the run's training files hold {len(originals)}: paraphrases are paired "
                              "with training records by position, so the file needs one paraphrase per training record, in order")
    pairs = [(o, p) for o, p in zip(originals, para) if o.source in trained_sources and not o.is_text and not p.is_text]
    if not pairs:
        raise DataError(path, "no pair whose training record was trained on (all held out?)")
    if len(pairs) > max_n:
        pairs = random.Random(seed).sample(pairs, max_n)
    a = score(loaded, [_item(o) for o, _ in pairs], ["em"], max_new_tokens, batch_size, on_batch=on_batch)
    b = score(loaded, [_item(p) for _, p in pairs], ["em"], max_new_tokens, batch_size, on_batch=on_batch)
    flipped = [{"train_record": o.source, "paraphrase_record": p.source, "on_train_phrasing": pa, "on_paraphrase": pb,
                "paraphrase_reference": clean(p.messages[-1]["content"])}
               for (o, p), pa, pb, ca, cb in zip(pairs, a.predictions, b.predictions, a.correct, b.correct) if ca and not cb]
    em_a, em_b = a.metrics["em"], b.metrics["em"]
    return {"file": path, "pairs": len(pairs), "em_train_phrasing": em_a, "em_paraphrase": em_b, "memorization_gap": em_a - em_b,
            "right_on_train_wrong_on_paraphrase": flipped}
