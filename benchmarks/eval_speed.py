"""Benchmark of the generation behind ``tunelab eval``: batched against one prompt at a time.

    python benchmarks/eval_speed.py                       # 200 prompts, embedded SmolLM2-135M, fp32
    python benchmarks/eval_speed.py --n 50 --threads 1    # smaller

The same 200 prompts (the instructions of ../shared/data/alpaca_en_demo.json, else synthetic
questions), the same model and dtype, greedy, ``--max-new-tokens`` 32, the training template:

* baseline: a plain loop calling ``model.generate`` on one prompt at a time (the training
  template's prompt ids, greedy, the end-of-turn ids as eos, the KV cache), decoded and cut at
  the end-of-turn marker;
* batched: ``infer.generate.generate_batched`` (prompts sorted by length, left padding with an
  attention mask, KV cache, each row stopping at its end-of-turn token), as ``tunelab eval`` does.

Prints both times, ``speedup Nx``, and checks that the two outputs are identical (fp32: both
decode the same argmax; in bf16, padding changes the matmul shapes and so the rounding, and a
near-tie can flip). Target: >= 4x on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"


def prompts(n: int) -> list[str]:
    if ALPACA.exists():
        rows = json.loads(ALPACA.read_text())
        out = [(r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip() for r in rows]
    else:
        out = [f"Give one short fact about the number {i}." for i in range(n)]
    return (out * (n // len(out) + 1))[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tunelab.data.render import Renderer
    from tunelab.infer.generate import Loaded, generate_batched
    from tunelab.models.generation import cut_at_markers
    from tunelab.models.load import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    tok = load_tokenizer(path)
    loaded = Loaded(load_model(path, dtype).eval(), tok, Renderer(tok, "auto"), torch.device("cpu"))
    convs = [[{"role": "user", "content": p}] for p in prompts(args.n)]
    print(f"{args.n} prompts, {args.model} ({args.dtype}), {args.threads} threads, max_new_tokens {args.max_new_tokens}, "
          f"batch size {args.batch_size}", flush=True)

    t = time.perf_counter()
    batched = generate_batched(loaded, convs, args.max_new_tokens, args.batch_size)
    t_batched = time.perf_counter() - t
    print(f"batched:           {t_batched:7.1f} s  ({args.n / t_batched:.2f} prompts/s)", flush=True)
    t = time.perf_counter()
    single = []
    for msgs in convs:
        ids = torch.tensor([loaded.renderer.prompt_ids(msgs)])
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                        do_sample=False, temperature=None, top_p=None, top_k=None,
                                        eos_token_id=loaded.renderer.stop_token_ids, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        single.append(text[:cut_at_markers(text, loaded.renderer.eot_markers)].strip())
    t_single = time.perf_counter() - t
    print(f"one at a time:     {t_single:7.1f} s  ({args.n / t_single:.2f} prompts/s)", flush=True)

    same = sum(a == b for a, b in zip(batched, single))
    print(f"identical outputs: {same}/{args.n}")
    for k, (a, b) in enumerate(zip(batched, single)):
        if a != b:
            print(f"  first difference, prompt {k}: batched {a[:80]!r} vs single {b[:80]!r}")
            break
    print(f"speedup {t_single / t_batched:.1f}x")
    return 0 if same == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
