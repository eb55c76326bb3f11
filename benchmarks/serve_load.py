"""Load test of ``tunelab serve``: N requests from C concurrent clients.

    python benchmarks/serve_load.py MODEL [--requests 200] [--clients 8] [--max-queue 4] [--max-tokens 8]

Starts ``tunelab serve MODEL --port 0 --max-queue Q`` in a subprocess, sends the requests as
plain HTTP posts without retries (so 429s are counted, not hidden), and prints the status
counts, latency p50/p99 of all requests and of the answered ones, and whether the server is
alive afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servehelp import Server, http  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    server = Server(args.model, "--model-name", "m", "--max-queue", str(args.max_queue))
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Write a poem about the sea."}],
                           "max_tokens": args.max_tokens, "temperature": 0}).encode()
        statuses, lat = [], []
        lock = threading.Lock()

        def one(_: int) -> None:
            t = time.perf_counter()
            status, _body = http("POST", server.url + "/chat/completions", body)
            with lock:
                statuses.append(status)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        lat_ms = np.array(lat) * 1000
        ok = lat_ms[np.array(statuses) == 200]
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        alive = server.alive() and http("GET", server.root + "/health")[1]["status"] == "ok"
        print(f"requests {args.requests}, clients {args.clients}, max_queue {args.max_queue}, max_tokens {args.max_tokens}: "
              f"status counts {counts}; all p50 {np.percentile(lat_ms, 50):.0f} ms p99 {np.percentile(lat_ms, 99):.0f} ms; "
              f"answered (200) p50 {np.percentile(ok, 50):.0f} ms p99 {np.percentile(ok, 99):.0f} ms; "
              f"{len(ok) / wall:.1f} answered/s over {wall:.1f} s; server alive after: {alive}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
