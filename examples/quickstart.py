"""The quickstart: fine-tune the embedded SmolLM2-135M-Instruct on a generated order-ticket
task and print three generations before and after training.

    python examples/quickstart.py [--set train.max_steps=20 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_quickstart_data import main as make_data  # noqa: E402

from tunelab.config import load_config  # noqa: E402
from tunelab.console import quiet_libraries  # noqa: E402
from tunelab.infer.generate import generate, load_for_inference  # noqa: E402
from tunelab.train.recipe import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the libraries' progress bars and warnings")
    args = ap.parse_args()
    quiet_libraries(args.verbose)  # as the tunelab command does
    t0 = time.perf_counter()
    make_data(str(HERE / "data"))
    cfg, applied = load_config(HERE / "quickstart.yaml", args.set)
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in (HERE / "data" / "prompts.jsonl").read_text().splitlines()]

    base = load_for_inference(cfg.model.name, cfg.template)
    before = generate(base, prompts, max_new_tokens=64)
    del base

    t_train = time.perf_counter()
    result = train(cfg, applied)
    train_s = time.perf_counter() - t_train

    tuned = load_for_inference(str(cfg.run_dir))
    after = generate(tuned, prompts, max_new_tokens=64)

    for p, b, a in zip(prompts, before, after):
        print("=" * 80)
        print("PROMPT:", p[-1]["content"].split("\n\n", 1)[-1])
        print("BEFORE:", b)
        print("AFTER: ", a)
    print("=" * 80)
    print(f"train {train_s:.0f} s, {result.tokens_per_s:.0f} tokens/s (last log interval); best eval loss "
          f"{result.best_eval:.4f} at step {result.best_step}; whole quickstart {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
