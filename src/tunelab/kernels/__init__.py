"""Fused ops and blocks for the fast path, one per file, each with a thin functional wrapper.

After Liger-Kernel's ``ops/``: nothing here knows about configs, data or runs, and nothing here
imports the rest of tunelab (tests/test_architecture.py enforces it).

* :mod:`.linear_ce`: lm_head + cross-entropy over selected rows, logits never kept.
* :mod:`.fused_llama`: the Llama-family decoder with LoRA, backward written out (CPU).
"""
