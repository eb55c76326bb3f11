"""What ``max_seq_len`` costs the data: records dropped or cut, and the length that keeps 99%.

:func:`truncation_summary` is the one place this is computed; the training header, ``preview``
and ``tunelab doctor`` report it. Rule: dropping or cutting more than 2% of the records is a
warning, never a silent line (docs/practices.md#data-truncation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

WARN_FRACTION = 0.02  # more than this share of records dropped or cut: a warning
KEEP_FRACTION = 0.99  # the suggested max_seq_len keeps this share of records whole


def length_keeping(lengths: Sequence[int], fraction: float = KEEP_FRACTION) -> int:
    """The smallest length L such that at least ``fraction`` of ``lengths`` are <= L (0 if empty)."""
    if not lengths:
        return 0
    ordered = sorted(lengths)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class TruncationSummary:
    records: int  # trainable records measured
    over: int  # longer than max_seq_len
    dropped: int  # of those, not trained at all
    cut: int  # of those, trained with tokens cut (prompt or completion)
    max_seq_len: int
    truncation: str  # the configured mode: drop | truncate_prompt
    keeps_99: int  # the max_seq_len that keeps 99% of the records whole
    longest: int

    @property
    def fraction(self) -> float:
        return self.over / self.records if self.records else 0.0

    @property
    def warn(self) -> bool:
        return self.fraction > WARN_FRACTION

    def line(self, what: str = "train") -> str:
        """One line for a header: counts, the configured mode, and what to set."""
        if not self.over:
            return f"{what}: all {self.records} records fit max_seq_len {self.max_seq_len} (longest {self.longest} tokens)"
        done = (f"{self.dropped} dropped" if self.truncation == "drop"
                else f"{self.cut} prompt-truncated from the left" + (f", {self.dropped} dropped (completion does not fit)" if self.dropped else ""))
        return (f"{what}: {self.over} of {self.records} records ({100 * self.fraction:.1f}%) are longer than max_seq_len "
                f"{self.max_seq_len} (truncation: {self.truncation}): {done}; "
                f"max_seq_len {self.keeps_99} keeps 99% of the records (--set data.max_seq_len={self.keeps_99})")


def truncation_summary(lengths: Sequence[int], max_seq_len: int, truncation: str,
                       dropped: Optional[int] = None, cut: Optional[int] = None) -> TruncationSummary:
    """Summarise what ``max_seq_len`` does to records of full token ``lengths`` under ``truncation``.

    ``dropped``/``cut``: the encoder's exact counts where known (``truncate_prompt`` drops a
    record whose completion alone does not fit); without them every over-long record counts as
    dropped (``drop``) or cut (``truncate_prompt``)."""
    over = sum(1 for n in lengths if n > max_seq_len)
    if dropped is None or cut is None:
        dropped, cut = (over, 0) if truncation == "drop" else (0, over)
    return TruncationSummary(len(lengths), over, dropped, cut, max_seq_len, truncation,
                             length_keeping(lengths), max(lengths, default=0))


def summary_from_stats(stats: Any, max_seq_len: int, truncation: str) -> TruncationSummary:
    """:func:`truncation_summary` of an ``EncodeStats`` (``Renderer.encode_many``'s report)."""
    cut = stats.prompt_truncated + stats.completion_truncated
    over = sum(1 for n in stats.lengths if n > max_seq_len)
    return truncation_summary(stats.lengths, max_seq_len, truncation, dropped=over - cut, cut=cut)
