"""``tunelab serve`` with a real client: the official ``openai`` package against the server on
127.0.0.1 with a tiny model (chat, streaming, stop, n, malformed bodies), the served completion
equal to ``tunelab generate``'s, a bounded load test, and the queue's 429."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from servehelp import Server, http
from tinymodels import make_learnable_llama

PROMPT = "Write a poem about the sea."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    # init_range 0.2: peaked logits, so greedy decoding writes words instead of one repeated token
    return make_learnable_llama(tmp_path_factory.mktemp("serve") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--model-name", "tiny", "--max-queue", "4")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kw):
    kw.setdefault("messages", [{"role": "user", "content": PROMPT}])
    return client.chat.completions.create(model="tiny", **kw)


def test_models_health_and_chat(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = http("GET", server.root + "/health")[1]
    assert h["status"] == "ok" and h["max_queue"] == 4
    r = _chat(client, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    # greedy is deterministic
    assert _chat(client, max_tokens=12, temperature=0).choices[0].message.content == c.message.content
    # n: several choices
    r = _chat(client, max_tokens=6, temperature=1.0, n=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_served_completion_equals_tunelab_generate(server, client, model_dir):
    served = _chat(client, max_tokens=16, temperature=0).choices[0].message.content
    out = subprocess.run([sys.executable, "-m", "tunelab", "generate", model_dir, "--prompt", PROMPT, "--max-new-tokens", "16", "--json"],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["completion"] == served


def test_streaming_equals_the_plain_answer(client):
    plain = _chat(client, max_tokens=16, temperature=0).choices[0]
    pieces, finish = [], []
    for chunk in _chat(client, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish.append(c.finish_reason)
    assert len(pieces) > 1  # it really streams
    assert "".join(pieces) == plain.message.content and finish == [plain.finish_reason]


def test_stop_strings_cut_the_answer(client):
    full = _chat(client, max_tokens=16, temperature=0).choices[0].message.content
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    r = _chat(client, max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert r.finish_reason == "stop" and r.message.content == full[: full.index(stop)].strip()
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, max_tokens=16, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.message.content


def test_malformed_requests_get_a_400_json_error_and_the_server_keeps_serving(server, client):
    url = server.url + "/chat/completions"
    for body in (b"{not json", b"[1, 2]", json.dumps({"messages": []}).encode(), json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
                 json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}).encode()):
        status, js = http("POST", url, body)
        assert status == 400, body
        err = js["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _chat(client, temperature=5)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert http("GET", server.root + "/nope")[0] == 404
    assert server.alive() and _chat(client, max_tokens=4).choices[0].message.content is not None


def test_bounded_load_200_requests_8_clients(server):
    """Every request is answered, 200 or 429/503, and the server is alive afterwards."""
    url = server.url + "/chat/completions"
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}).encode()
    statuses, latencies = [], []
    lock = threading.Lock()

    def one(i: int) -> None:
        t = time.perf_counter()
        status, js = http("POST", url, body)
        dt = time.perf_counter() - t
        with lock:
            statuses.append(status)
            latencies.append(dt)
        assert "choices" in js if status == 200 else "error" in js

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))
    assert len(statuses) == 200 and set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    ok = statuses.count(200)
    assert ok >= 1
    lat = np.array(latencies) * 1000
    good = lat[np.array(statuses) == 200]
    print(f"\nload test: 200 requests, 8 concurrent clients, max_queue 4: {ok} x 200, {statuses.count(429)} x 429, "
          f"{statuses.count(503)} x 503; latency of all p50 {np.percentile(lat, 50):.0f} ms p99 {np.percentile(lat, 99):.0f} ms, "
          f"of the 200s p50 {np.percentile(good, 50):.0f} ms p99 {np.percentile(good, 99):.0f} ms (shared machine)")
    assert server.alive() and http("GET", server.root + "/health")[1]["status"] == "ok"
