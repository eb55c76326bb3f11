"""Sample generations for the report: a few eval prompts answered by the base model (before)
and by the trained run (after), greedy, with the training template."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config
from ..files import atomic_write_json


def write_samples(cfg: Config) -> Optional[Path]:
    n = cfg.report.samples
    if n <= 0:
        return None
    from ..data.pipeline import prepare_conversations
    from ..infer.generate import generate, load_for_inference

    _, evals, _, _ = prepare_conversations(cfg)
    convs = [c for c in evals if c.messages and c.messages[-1]["role"] == "assistant"][:n]
    if not convs:
        return None
    after = load_for_inference(str(cfg.run_dir))
    prompts = [[dict(m) for m in c.messages[:-1]] for c in convs]
    out_after = generate(after, prompts, cfg.report.sample_tokens)
    del after
    before = load_for_inference(str(cfg.run_dir), adapter=False) if cfg.method != "full" else load_for_inference(cfg.model.name, cfg.template)
    out_before = generate(before, prompts, cfg.report.sample_tokens)
    rows = [{"prompt": p[-1]["content"], "before": b, "after": a, "reference": c.messages[-1]["content"], "source": c.source}
            for p, b, a, c in zip(prompts, out_before, out_after, convs)]
    return atomic_write_json(cfg.run_dir / "samples.json", rows)
