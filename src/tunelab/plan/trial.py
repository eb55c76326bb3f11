"""One sweep trial, in its own process: ``python -m tunelab.plan.trial TRIAL_YAML KEY``.

Trains per the trial's config (doctor and audit off: the sweep checked the config once) and
writes ``result.json`` (eval loss, steps, seconds, the config's key) atomically at the end, so
a sweep that is rerun knows this trial is finished.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    import torch

    threads = int(os.environ.get("TUNELAB_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    from ..config import load_config
    from ..files import atomic_write_json
    from ..train.recipe import train
    from ..train.rundir import holds_run

    path, key = argv[0], argv[1]
    cfg, _ = load_config(path)
    t0 = time.perf_counter()
    # a trial rerun after an interruption: its partial run is moved aside (never deleted), as --overwrite does
    result = train(cfg, overwrite=holds_run(cfg.run_dir))
    atomic_write_json(cfg.run_dir / "result.json", {"key": key, "eval_loss": result.best_eval, "best_step": result.best_step,
                                                     "steps": result.steps, "seconds": round(time.perf_counter() - t0, 1),
                                                     "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
