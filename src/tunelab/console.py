"""A quiet console: the libraries' progress bars and known-harmless warnings off unless ``-v``.

Imports nothing of tunelab (layer 0); the CLI calls :func:`quiet_libraries` first thing, and so
can any script that drives tunelab (``examples/quickstart.py``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers whose INFO/WARNING lines are noise in a run's console. httpx2 is the openai client's
# HTTP stack (one INFO line per request). bitsandbytes is here because peft imports it on a
# plain LoRA run; a QLoRA run turns it back on (``allow_logger``).
NOISY_LOGGERS = ("transformers", "accelerate", "peft", "httpx", "httpx2", "openai", "huggingface_hub", "datasets", "bitsandbytes", "torch.distributed")

# (message regex, category): warnings that say nothing the user can act on.
HARMLESS_WARNINGS = (
    (r".*is_gradient_checkpointing.*is deprecated", FutureWarning),  # transformers 5 via peft
)


def quiet_libraries(verbose: bool = False) -> None:
    """Silence transformers'/hub progress bars, chatty loggers and known-harmless warnings.

    ``verbose``: leave everything as the libraries set it (``tunelab -v``)."""
    if verbose:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers at import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if "huggingface_hub" in sys.modules:  # already imported: the env var came too late
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()


def allow_logger(name: str) -> None:
    """Let ``name``'s warnings through again (bitsandbytes in a QLoRA run)."""
    logging.getLogger(name).setLevel(logging.NOTSET)
