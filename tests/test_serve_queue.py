"""The serve engine's bounded queue: a request that finds it full gets a 429 at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tunelab.serve.app import Engine, Job
from tunelab.serve.protocol import ChatRequest, RequestError, parse_chat_request


def test_a_full_queue_answers_429_and_the_engine_goes_on():
    gate = threading.Event()
    started = threading.Event()

    class Done:
        text, finish_reason, prompt_tokens, completion_tokens = "ok", "stop", 1, 1

    def gen(req, i, on_text, cancelled):
        started.set()
        gate.wait(10)
        return Done()

    engine = Engine(gen, max_queue=1)
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job(ChatRequest([{"role": "user", "content": "x"}]), loop, asyncio.Queue()) for _ in range(3)]
        engine.submit(jobs[0])
        assert started.wait(10)  # the worker holds job 0
        engine.submit(jobs[1])  # waits in the queue
        with pytest.raises(RequestError) as e:
            engine.submit(jobs[2])
        assert e.value.status == 429 and e.value.body()["error"]["code"] == "queue_full"
        assert engine.stats["rejected"] == 1
        gate.set()
        for _ in range(1000):  # both accepted requests are served
            if engine.stats["completed"] == 2:
                break
            threading.Event().wait(0.01)
        assert engine.stats["completed"] == 2
        engine.stop()
        engine.thread.join(10)
        assert not engine.alive
        with pytest.raises(RequestError) as e:
            engine.submit(jobs[2])
        assert e.value.status == 503
    finally:
        gate.set()
        loop.close()


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
])
def test_request_validation_names_the_parameter(body, param):
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, 2048)
    assert e.value.status == 400 and e.value.param == param


def test_request_parsing_defaults_and_text_parts():
    r = parse_chat_request({"messages": [{"role": "developer", "content": "be brief"},
                                         {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
                            "stop": "END", "max_completion_tokens": 7}, 2048)
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert r.stop == ["END"] and r.max_tokens == 7 and r.n == 1 and not r.stream
