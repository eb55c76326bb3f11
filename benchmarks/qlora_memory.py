"""QLoRA vs LoRA on a bf16 base: weight memory, peak RSS and step time on SmolLM2-135M.

    python benchmarks/qlora_memory.py                 # all four configs, ~6 min on 2 CPU cores
    python benchmarks/qlora_memory.py --steps 3 --seq 128

Configs (each in its own subprocess, so one's peak RSS cannot pollute another's):
  lora-bf16   method: lora,  model.dtype: bf16  (the reference: LoRA on a bf16 base)
  qlora       method: qlora, model.dtype: auto  (the default: NF4 linears; embeddings, lm_head
              and norms in the compute dtype, which is fp32 on a CPU without native bf16)
  qlora-bf16  method: qlora, model.dtype: bf16  (NF4 linears, unquantized parts in bf16)
  lora-fp32   method: lora,  model.dtype: fp32  (same compute dtype as qlora on such a CPU: the
              step-time cost of NF4 itself, apart from bf16's)

Each builds the model through tunelab's own ``build_model`` (the training path), counts its
weights by kind, then runs 1 warm-up + at least ``--steps`` timed optimizer steps (up to 12 while
under ``--min-time`` seconds, so fast configs get more samples) on the same fixed batch
(forward + backward + AdamW, under the recipe's autocast, on the transformers decoder for every
config unless ``--fused``). Reported: weight bytes by kind (from
``tunelab.train.memory``), peak RSS of the whole process (``ru_maxrss``: includes loading and
the pages of the mmapped checkpoint, which is fp32 for the embedded model whatever the
config), anonymous RSS after building (after gc + malloc_trim, so that what the loader's
threads freed but glibc kept does not count: without it the same build measured 417 and 666 MB)
and its peak sampled during the steps, step times.

Threads default to 1: the same for every config, and on a shared, loaded machine a 2-thread
op waits for a descheduled worker (measured once here: 16.8 s vs 1.1 s for the same 16-token
QLoRA step). Pass ``--threads 0`` (torch's default) on an idle machine.

Targets checked: NF4 linear weights <= 0.6 bytes/parameter including scales; base weight memory
<= 0.45x the bf16 base. bf16 matmuls are emulated (slow) on CPUs without AVX512-BF16/AMX, which
is why the step count is small; the step-time ratio there says more about bf16 than about NF4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

MODEL = "smollm2-135m-instruct"
CONFIGS = {
    "lora-bf16": ("lora", "bf16"),
    "qlora": ("qlora", "auto"),
    "qlora-bf16": ("qlora", "bf16"),
    "lora-fp32": ("lora", "fp32"),
}
TEXT = (
    "Low-rank adaptation freezes the pretrained weights and trains a pair of small matrices per layer. "
    "QLoRA goes further: the frozen weights are stored as 4-bit NormalFloat codes with one scale per block "
    "of 64 values, and the scales are quantized again. Matmuls dequantize a block at a time. "
)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _anon() -> int:
    """Anonymous resident memory (Linux RssAnon): what the process owns, without file pages
    such as the mmapped safetensors file, which stays mapped after loading. RSS elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss()


def _release_freed() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), for steady-state numbers."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class AnonSampler:
    """Highest anonymous RSS seen while running (sampled every few ms in a thread)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon())
            time.sleep(self.every_s)

    def __enter__(self) -> "AnonSampler":
        self.peak = _anon()
        self._t.start()
        return self

    def __exit__(self, *a) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _anon())


def worker(name: str, batch: int, seq: int, steps: int, threads: int | None, min_time: float = 0.0, max_steps: int = 12,
           fused: bool = False) -> dict:
    import inspect

    import torch

    if threads:
        torch.set_num_threads(threads)
    from tunelab.config import config_from_dict
    from tunelab.models.build import build_model
    from tunelab.train.loss import CausalLMLoss
    from tunelab.train.memory import param_breakdown

    method, dtype = CONFIGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rss_start, anon_start = _rss(), _anon()
    cfg = config_from_dict({"method": method, "model": {"name": MODEL, "dtype": dtype}})
    t = time.perf_counter()
    built = build_model(cfg, device)
    build_s = time.perf_counter() - t
    _release_freed()
    rss_built, anon_built = _rss(), _anon()
    kinds = param_breakdown(built.model)

    ids = built.tokenizer(TEXT * (1 + seq // 40))["input_ids"][:seq]
    input_ids = torch.tensor([ids] * batch, device=device)
    mask = torch.ones_like(input_ids)
    # Like for like by default: every config on the transformers decoder. The recipe's fused
    # LoRA decoder (train.fused_decoder) does not take a quantized base, so with --fused the
    # lora rows may run a faster decoder than the qlora rows.
    kw = {"fused_decoder": fused} if "fused_decoder" in inspect.signature(CausalLMLoss).parameters else {}
    loss_fn = CausalLMLoss(built.model, True, **kw).train()
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = (lambda: torch.autocast(device.type, dtype=built.compute_dtype)) if built.compute_dtype != torch.float32 else contextlib.nullcontext

    def step() -> float:
        with autocast():
            loss_sum, n = loss_fn(input_ids, mask, input_ids)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss_sum / n)

    times, losses = [], []
    with AnonSampler() as sampler:
        losses.append(step())  # warm-up: allocator, lazy inits
        while len(times) < steps or (sum(times) < min_time and len(times) < max_steps):
            t = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t)
    out = {
        "config": name, "method": method, "dtype": dtype, "compute_dtype": str(built.compute_dtype).replace("torch.", ""),
        "device": str(device), "threads": torch.get_num_threads(), "kinds": kinds, "build_s": build_s,
        "rss_start": rss_start, "rss_built": rss_built, "anon_start": anon_start, "anon_built": anon_built, "anon_peak_train": sampler.peak,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": times, "losses": losses, "tokens_per_step": batch * seq,
        "decoder": "fused " + str(getattr(loss_fn, "fused_reason", "n/a")) if kw.get("fused_decoder") else "transformers",
    }
    if device.type == "cuda":
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:7.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64, help="tokens per example (all trained)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (at least)")
    ap.add_argument("--min-time", type=float, default=20.0, help="keep timing steps (up to 12) until this many seconds: fast configs get more samples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each worker (0: torch's default)")
    ap.add_argument("--fused", action="store_true", help="let CausalLMLoss use the fused LoRA decoder where it applies (not to qlora)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print("RESULT " + json.dumps(worker(a._worker, a.batch, a.seq, a.steps, a.threads, a.min_time, fused=a.fused)), flush=True)
        return 0

    from tunelab.models.load import resolve_model_path

    path = resolve_model_path(MODEL)  # converts the embedded GGUF once (cached) before any timing
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    print(f"model {MODEL} ({path}); batch {a.batch} x {a.seq} tokens; 1 warm-up + at least {a.steps} timed steps "
          f"(more, up to 12, until {a.min_time:g} s); {a.threads or 'default'} thread(s); "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    res = {}
    for n in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", n, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
               "--min-time", str(a.min_time), "--threads", str(a.threads)] + (["--fused"] if a.fused else [])
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(f"{n}: failed (exit {p.returncode})\n{p.stderr[-3000:]}")
            return 1
        res[n] = json.loads(line[len("RESULT "):])
        print(f"  {n}: done in {time.perf_counter() - t:.0f} s", flush=True)

    print("\nweights (tunelab.train.memory; bytes/param in brackets)")
    print(f"  {'config':<11} {'compute':>8} {'NF4 linears':>24} {'unquantized':>24} {'base total':>11} {'adapters':>9}")
    for n, r in res.items():
        k = r["kinds"]
        fq, ff, tr = k["frozen quantized"], k["frozen full precision"], k["trainable"]
        q = f"{mb(fq['bytes'])} [{fq['bytes'] / fq['params']:.3f}]" if fq["params"] else "-"
        f = f"{mb(ff['bytes'])} [{ff['bytes'] / max(ff['params'], 1):.3f}]"
        print(f"  {n:<11} {r['compute_dtype']:>8} {q:>24} {f:>24} {mb(fq['bytes'] + ff['bytes']):>11} {mb(tr['bytes']):>9}")
    print("memory and time (RSS = resident set; anon = RSS without file pages such as the mmapped checkpoint)")
    print(f"  {'config':<11} {'peak RSS':>10} {'anon built':>11} {'peak anon train':>16} {'step median':>12} {'tokens/s':>9}   (peak RSS includes loading)")
    for n, r in res.items():
        med = statistics.median(r["step_s"])
        print(f"  {n:<11} {mb(r['rss_peak']):>10} {mb(r['anon_built']):>11} {mb(r['anon_peak_train']):>16} {med:>10.2f} s {r['tokens_per_step'] / med:>9.1f}")
    for n, r in res.items():
        print(f"  {n}: step times {', '.join(f'{s:.2f}' for s in r['step_s'])} s; losses {', '.join(f'{l:.3f}' for l in r['losses'])}; "
              f"before loading: RSS {mb(r['rss_start']).strip()}, anon {mb(r['anon_start']).strip()}; {r['threads']} thread(s) on {r['device']}; decoder: {r['decoder']}")

    ref = res.get("lora-bf16")
    print()
    for n in [n for n in res if n.startswith("qlora")]:
        r = res[n]
        fq, ff = r["kinds"]["frozen quantized"], r["kinds"]["frozen full precision"]
        bpp = fq["bytes"] / fq["params"]
        print(f"check {n}: NF4 linear weights {bpp:.3f} bytes/param incl. scales <= 0.6: {'PASS' if bpp <= 0.6 else 'FAIL'}")
        if ref is None:
            continue
        rk = ref["kinds"]
        base_ref = rk["frozen quantized"]["bytes"] + rk["frozen full precision"]["bytes"]
        ratio = (fq["bytes"] + ff["bytes"]) / base_ref
        print(f"check {n}: base weight memory {mb(fq['bytes'] + ff['bytes']).strip()} = {ratio:.3f}x the bf16 base ({mb(base_ref).strip()}) <= 0.45: "
              f"{'PASS' if ratio <= 0.45 else 'FAIL'} (unquantized: {ff['params']:,} params in {r['compute_dtype']}, {mb(ff['bytes']).strip()})")
        print(f"  {n} / lora-bf16: peak RSS {r['rss_peak'] / ref['rss_peak']:.2f}x, peak anon while training "
              f"{r['anon_peak_train'] / ref['anon_peak_train']:.2f}x, anon after build {r['anon_built'] / ref['anon_built']:.2f}x, "
              f"step time {statistics.median(r['step_s']) / statistics.median(ref['step_s']):.2f}x")
    if "qlora" in res and "lora-fp32" in res:
        q, l = res["qlora"], res["lora-fp32"]
        print(f"  qlora / lora-fp32 (both {q['compute_dtype']} compute): step time "
              f"{statistics.median(q['step_s']) / statistics.median(l['step_s']):.2f}x, peak anon while training {q['anon_peak_train'] / l['anon_peak_train']:.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0  # the checks are reported, not enforced: which hold depends on the hardware (see the qlora row)


if __name__ == "__main__":
    sys.exit(main())
