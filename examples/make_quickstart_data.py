"""Generate the quickstart dataset: turn a free-text order into a fixed "ticket" line.

Written for tunelab (not copied from anywhere). SFT teaches format and behaviour
(docs/practices.md#sft-format-not-facts), so the task is a house format the base model cannot guess:
``TICKET item=mug color=blue qty=8 city=Madrid`` and nothing else. Seeded, so every run
gets the same data.

    python examples/make_quickstart_data.py OUT_DIR   # writes train.jsonl, eval.jsonl, prompts.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ITEMS = ["mug", "notebook", "backpack", "lamp", "chair", "umbrella", "scarf", "kettle", "pillow", "candle",
         "bottle", "jacket", "clock", "vase", "towel", "basket", "helmet", "wallet", "blanket", "teapot"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "purple", "orange", "pink"]
CITIES = ["Paris", "Berlin", "Madrid", "Lisbon", "Oslo", "Vienna", "Dublin", "Prague", "Warsaw", "Athens",
          "Rome", "Tokyo", "Lima", "Cairo", "Toronto", "Sydney", "Nairobi", "Seoul", "Quito", "Helsinki"]
PHRASINGS = [
    "I'd like {q} {c} {i}s sent to {city}, please.",
    "Please ship {q} {c} {i}s to {city}.",
    "Can I order {q} {i}s in {c}? Deliver to {city}.",
    "Send {q} of the {c} {i}s to my address in {city}.",
    "We need {q} {c} {i}s for the office in {city}.",
    "Order: {q} x {i}, colour {c}, destination {city}.",
    "Hi! Could you deliver {q} {c} {i}s to {city}? Thanks.",
    "Put me down for {q} {i}s, the {c} ones, shipping to {city}.",
    "My friend in {city} needs {q} {c} {i}s. Can you send them?",
    "{q} {c} {i}s to {city}, as soon as possible.",
]
INSTRUCTION = "Write the order ticket for this message."


def example(rng: random.Random, items: list[str], cities: list[str]) -> dict:
    q, c, i, city = rng.randint(1, 12), rng.choice(COLORS), rng.choice(items), rng.choice(cities)
    text = rng.choice(PHRASINGS).format(q=q, c=c, i=i, city=city)
    answer = f"TICKET item={i} color={c} qty={q} city={city}"
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}, {"role": "assistant", "content": answer}]}


def main(out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    # Eval and the prompts use items and cities that train never sees, so that every eval record
    # differs from every train record in at least two slots: one that differed only in quantity
    # or colour would be a near-duplicate, i.e. train/eval leakage (docs/practices.md#data-dedup),
    # and eval loss would overstate generalization. It also measures what SFT should teach: the
    # format, applied to values the model was not trained on.
    eval_items, eval_cities = set(rng.sample(ITEMS, 4)), set(rng.sample(CITIES, 4))
    pools = {"train": ([i for i in ITEMS if i not in eval_items], [c for c in CITIES if c not in eval_cities]),
             "eval": (sorted(eval_items), sorted(eval_cities))}
    seen: set[str] = set()
    split: dict[str, list[dict]] = {"train": [], "eval": []}
    for part, want in (("train", 320), ("eval", 80)):
        while len(split[part]) < want:  # unique prompts: no duplicates for the model to memorise
            ex = example(rng, *pools[part])
            key = ex["messages"][0]["content"]
            if key not in seen:
                seen.add(key)
                split[part].append(ex)
    rows = split["eval"]
    files = {"train.jsonl": split["train"], "eval.jsonl": rows[:77],
             "prompts.jsonl": [{"prompt": r["messages"][0]["content"]} for r in rows[77:]]}
    for name, data in files.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in data))
        tmp.replace(out_dir / name)
    print(f"wrote {', '.join(f'{k} ({len(v)})' for k, v in files.items())} to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "data"))
