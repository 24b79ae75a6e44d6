"""The server's HTTP API (moeops/serve/app.py, server.py) against real `moeops serve` processes: the official
`openai` client on every endpoint, streaming and not; error objects; overload (429), disconnects, 200
concurrent streams; /metrics counts; schemathesis over /openapi.json. The session `server` serves the test
registry's champion (v1, context 128); one more server (max_batch 1, max_waiting 1) is started for the queue
tests."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SERVE_CONTEXT, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families

MODEL = "moeops"
PROMPT = "def add(a, b):\n    return"
NO_EOS = {"ignore_eos": True}  # an untrained model may end at once; these tests need every token


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(served_registry):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(served_registry["tokenizer"]))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the server's /metrics."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_idle(url: str, version: str = "v1", timeout: float = 30.0) -> None:
    """Until the engine runs and queues nothing (a cancelled sequence leaves at the next step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(url)
        if not sample(m, "moeops_requests_running", model_version=version) and \
                not sample(m, "moeops_requests_waiting", model_version=version):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {timeout} s")


def error_of(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text and "\n" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ----------------------------------------------------------------- endpoints through the openai client


def test_models_version_health(server, client, served_registry):
    import onnxruntime

    # the registry's challenger v2 is loaded beside the champion (weight 0: pinned requests only)
    assert [m.id for m in client.models.list().data] == [MODEL, f"{MODEL}@v1", f"{MODEL}@v2"]
    assert {m.owned_by for m in client.models.list().data} == {"moeops"}
    assert client.models.retrieve(f"{MODEL}@v1").id == f"{MODEL}@v1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    v = httpx.get(server + "/version").json()
    assert (v["model"], v["version"], v["variant"], v["max_seq_len"]) == (MODEL, "v1", "int8", SERVE_CONTEXT)
    assert (v["challenger"], v["challenger_weight"]) == ("v2", 0.0)
    assert re.fullmatch(r"[0-9a-f]{64}", v["sha256"]) and v["ort_version"] == onnxruntime.__version__
    assert v["provider"] == "CPUExecutionProvider" and isinstance(v["cache_hit"], bool)
    assert v["load_seconds"] > 0 and v["warmup_seconds"] > 0
    assert httpx.get(server + "/health/live").status_code == 200
    assert httpx.get(server + "/health/ready").json() == {"status": "ready", "version": "v1"}


def test_completion_stream_matches_non_stream(client, tokenizer):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    whole = client.completions.create(**kw)
    (choice,) = whole.choices
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == MODEL
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    assert whole.usage.prompt_tokens == len(tokenizer.encode(PROMPT).ids)
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") and c.usage is None for c in chunks)


def test_include_usage_is_one_last_chunk(server, client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None and len(c.choices) == 1 for c in body) and body[-1].choices[0].finish_reason
    # on the wire: every other chunk says "usage": null, and the stream ends with [DONE]
    with httpx.stream("POST", server + "/v1/completions", json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    data = [json.loads(e) for e in events[:-1]]
    assert [d["usage"] is None for d in data] == [True] * (len(data) - 1) + [False]
    # without stream_options no chunk carries usage
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_echo_logprobs_scores_the_prompt(client, tokenizer):
    """What lm-evaluation-harness `local-completions` sends to score text."""
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    (choice,) = r.choices
    lp = choice.logprobs
    n = len(tokenizer.encode(PROMPT).ids)
    assert choice.text == PROMPT and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == n
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    # each top_logprobs entry holds the best alternative (and the token itself), so greedy-ness is readable
    assert all(max(top.values()) >= tl for top, tl in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))

    # the score of a token equals its logprob when it was generated after the same prefix
    gen = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                    extra_body=NO_EOS)
    token, token_lp = gen.choices[0].logprobs.tokens[0], gen.choices[0].logprobs.token_logprobs[0]
    scored = client.completions.create(model=MODEL, prompt=[tokenizer.encode(PROMPT).ids + [
        gen_id(tokenizer, PROMPT, gen.choices[0].text)]], max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].logprobs.tokens[-1] == token
    assert scored.choices[0].logprobs.token_logprobs[-1] == pytest.approx(token_lp, abs=1e-4)


def gen_id(tokenizer, prompt: str, text: str) -> int:
    """The id of a single generated token, from its text (the token decodes to exactly that text)."""
    ids = tokenizer.encode(prompt + text).ids[len(tokenizer.encode(prompt).ids):]
    if len(ids) == 1:
        return ids[0]
    return next(i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]) == text)


def test_stop_string_spanning_tokens(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0, extra_body=NO_EOS)
    full = client.completions.create(**kw).choices[0]
    tokens, text = full.logprobs.tokens, full.text
    # a stop string made of the end of one token and the start of the next
    k = next(k for k in range(2, len(tokens) - 1) if tokens[k] and tokens[k + 1])
    stop = tokens[k][-1] + tokens[k + 1][0]
    kw.pop("logprobs")
    cut = client.completions.create(**kw, stop=[stop, "never-seen-stop"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_list_prompts_one_choice_each(client):
    prompts = [PROMPT, "import os\n", "class A:"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0, extra_body=NO_EOS)
             .choices[0].text for p in prompts]
    together = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == alone
    assert together.usage.completion_tokens == 18
    texts = ["", "", ""]
    finished = []
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                           extra_body=NO_EOS):
        (c,) = chunk.choices
        texts[c.index] += c.text
        if c.finish_reason:
            finished.append(c.index)
    assert texts == alone and sorted(finished) == [0, 1, 2]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, extra_body=NO_EOS)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_chat(client, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    template = "system: You write Python.\nuser: A loop, please.\nassistant:"
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    (choice,) = r.choices
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(tokenizer.encode(template).ids)
    # the same as completing the documented template, stopping at the next user turn
    same = client.completions.create(model=MODEL, prompt=template, max_tokens=8, temperature=0, stop="\nuser:")
    assert choice.message.content == same.choices[0].text
    assert choice.finish_reason == same.choices[0].finish_reason

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and r.choices[0].finish_reason == "length"
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 and t.bytes for t in content)


# ----------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": PROMPT}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": SERVE_CONTEXT - 2}, 400, "max_tokens"),  # prompt + this > 128
    ({"model": MODEL, "prompt": "x = 1\n" * 200}, 400, "prompt"),  # past the context
    ({"model": MODEL, "prompt": "x = 1\n" * 200, "max_tokens": 0, "echo": True, "logprobs": 1}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[1, 2], [10**6]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": PROMPT, "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 300}, 400, "max_tokens"),  # over serve.max_new_tokens
    ({"model": MODEL, "prompt": PROMPT, "logprobs": 9}, 400, "logprobs"),
    ({"model": MODEL, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ({"model": f"{MODEL}@v9", "prompt": PROMPT}, 404, "model"),
])
def test_completion_errors(server, body, status, param):
    error_of(httpx.post(server + "/v1/completions", json=body), status, param)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x = 1\n" * 200}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_chat_errors(server, body, param):
    error_of(httpx.post(server + "/v1/chat/completions", json=body), 400, param)


def test_malformed_and_unknown(server, client):
    for content in (b"{not json", b"", b"[1, 2]", b'{"model": "moeops", "prompt": "a",}'):
        e = error_of(httpx.post(server + "/v1/completions", content=content,
                                headers={"content-type": "application/json"}), 400)
        assert e["type"] == "invalid_request_error"
    assert error_of(httpx.post(server + "/v1/completions", json={"model": "nope", "prompt": "a"}), 404,
                    "model")["code"] == "model_not_found"
    error_of(httpx.get(server + "/v1/nothing-here"), 404)
    error_of(httpx.get(server + "/v1/completions"), 405)
    # max_tokens 0 without echo: a valid, empty completion
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    # the server keeps serving
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].finish_reason


# ----------------------------------------------------------------- load, disconnects, metrics


async def stream_until_done(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, int]:
    """One streaming request, retrying 429s after their Retry-After (as the openai client does); (text, 429s)."""
    rejected = 0
    while True:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code == 429:
                rejected += 1
                await r.aread()
                await asyncio.sleep(int(r.headers["retry-after-ms"]) / 1000)
                continue
            assert r.status_code == 200, await r.aread()
            events = [line async for line in r.aiter_lines() if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        return "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]), rejected


def test_200_concurrent_streams_all_finish(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True}

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(limits=limits, timeout=120) as c:
            return await asyncio.gather(*(stream_until_done(c, server, body) for _ in range(200)))

    results = asyncio.run(main())
    assert len({text for text, _ in results}) == 1  # greedy: the same text, whatever the batch
    wait_idle(server)


def test_metrics_count_what_was_served(server, client):
    wait_idle(server)
    before = scrape(server)
    usages = [client.completions.create(model=MODEL, prompt=p, max_tokens=k, extra_body=NO_EOS).usage
              for p, k in ((PROMPT, 3), ("import sys", 7), ("x", 1))]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body=NO_EOS).usage
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}, extra_body=NO_EOS))[-1].usage
    httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "n": 3})  # a 400
    usages += [chat, streamed]
    after = scrape(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("moeops_requests_total", model_version="v1", status="200", tenant="") == 5
    # refused before a version was chosen: no x-moeops-model-version, so the label says "none"
    assert delta("moeops_requests_total", model_version="none", status="400", tenant="") == 1
    assert delta("moeops_prompt_tokens_total", model_version="v1") == sum(u.prompt_tokens for u in usages)
    assert delta("moeops_generation_tokens_total", model_version="v1") == sum(u.completion_tokens for u in usages)
    assert delta("moeops_time_to_first_token_seconds_count", model_version="v1") == 5
    assert sample(after, "moeops_model_info", model_version="v1", variant="int8",
                  sha256=httpx.get(server + "/version").json()["sha256"]) == 1
    r = httpx.get(server + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")


@pytest.fixture(scope="module")
def small_server(served_registry, tmp_path_factory):
    """One running sequence and one waiting place: the third request is over capacity."""
    proc, url = start_server(served_registry, tmp_path_factory.mktemp("small_server"), max_batch=1, max_waiting=1,
                             watch_interval_s=0)
    yield proc, url
    assert stop_server(proc) == 0  # SIGTERM drains and exits 0


def test_full_queue_answers_429_with_retry_after(small_server):
    """One running, one waiting: a burst of requests while a long one runs gets 429s at once; the admitted
    ones are served."""
    _, url = small_server
    long = {"model": MODEL, "prompt": "x", "max_tokens": SERVE_CONTEXT - 2, "ignore_eos": True}
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

    def through_openai() -> str:
        try:
            client.completions.create(model=MODEL, prompt="x", max_tokens=SERVE_CONTEXT - 2, extra_body=NO_EOS)
        except openai.RateLimitError:
            return "429"
        return "200"

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", url + "/v1/completions", json={**long, "stream": True}) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()
                await anext(lines)  # admitted and generating
                burst = await asyncio.gather(*(c.post(url + "/v1/completions", json=long) for _ in range(8)))
                official = await asyncio.gather(*(asyncio.to_thread(through_openai) for _ in range(8)))
                rest = [line async for line in lines if line]
            return burst, official, rest

    burst, official, rest = asyncio.run(main())
    statuses = sorted(r.status_code for r in burst)
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    for r in burst:
        if r.status_code == 429:
            assert error_of(r, 429)["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
        else:
            assert r.json()["usage"]["completion_tokens"] == SERVE_CONTEXT - 2
    assert "429" in official and set(official) <= {"200", "429"}  # the official client's RateLimitError
    assert rest[-1] == "data: [DONE]"


def test_disconnect_frees_the_slot(small_server):
    _, url = small_server
    wait_idle(url)
    before = scrape(url)
    body = {"model": MODEL, "prompt": "x", "max_tokens": SERVE_CONTEXT - 2, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)  # two chunks read, then the client goes away
    wait_idle(url)
    generated = sample(scrape(url), "moeops_generation_tokens_total", model_version="v1") - \
        sample(before, "moeops_generation_tokens_total", model_version="v1")
    assert generated < SERVE_CONTEXT - 2  # cancelled, not run to the end

    # not streaming: the server notices the closed connection while it generates, and stops too
    before = scrape(url)
    body = json.dumps({**body, "stream": False}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while not sample(scrape(url), "moeops_requests_running", model_version="v1"):
            assert time.monotonic() < deadline
    wait_idle(url)
    after = scrape(url)
    generated = sample(after, "moeops_generation_tokens_total", model_version="v1") - \
        sample(before, "moeops_generation_tokens_total", model_version="v1")
    assert generated < SERVE_CONTEXT - 2
    assert sample(after, "moeops_requests_total", model_version="v1", status="499", tenant="") == \
        sample(before, "moeops_requests_total", model_version="v1", status="499", tenant="") + 1
    # the only slot serves the next request
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_a_client_that_never_reads_blocks_nobody(server):
    wait_idle(server)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True,
                       "echo": True, "logprobs": 5}).encode()
    host, port = server.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # back-pressure after a few chunks
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    try:
        client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=30)
        for _ in range(5):
            assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].finish_reason
        wait_idle(server)  # its sequence finished generating although nobody reads it
    finally:
        s.close()


# ----------------------------------------------------------------- settings


@pytest.mark.parametrize("serve, message", [
    ({"bogus": 1}, "serve.bogus: unknown key"),
    ({"max_batch": "many"}, "serve.max_batch: Input should be a valid integer"),
    ({"port": 70000}, "serve.port: Input should be less than or equal to 65535"),
    ({"scheduling": "dynamic"}, "serve.scheduling: Input should be 'continuous' or 'static'"),
    ({"watch_interval_s": -1.0}, "serve.watch_interval_s: Input should be greater than or equal to 0"),
])
def test_serve_params_are_validated(tmp_path, serve, message):
    from moeops.cli import UserError
    from moeops.config import load_section

    (tmp_path / "params.yaml").write_text(json.dumps({"serve": serve}))
    with pytest.raises(UserError) as e:
        load_section("serve", tmp_path / "params.yaml")
    assert str(e.value) == f"{tmp_path / 'params.yaml'}: {message}"


def test_bad_serve_params_exit_2_before_binding(tmp_path):
    from conftest import stage_env

    (tmp_path / "params.yaml").write_text("serve:\n  max_batch: 0\n")
    proc = subprocess.run([sys.executable, "-m", "moeops", "serve", "--params", "params.yaml"], cwd=tmp_path,
                          env=stage_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params.yaml: serve.max_batch: Input should be greater than or equal to 1"


# ----------------------------------------------------------------- the schema


def test_openapi_declares_errors_not_422(server):
    schema = httpx.get(server + "/openapi.json").json()
    ops = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "404", "429", "503"} <= set(ops) and "422" not in ops
    assert "text/event-stream" in ops["200"]["content"]


def test_schemathesis(server, tmp_path):
    """Requests generated from /openapi.json (valid and invalid, boundary values, links): no 5xx, every
    status, content type, header and body (errors included) as documented, invalid data refused."""
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
              "response_headers_conformance,negative_data_rejection")
    proc = subprocess.run([str(Path(sys.executable).parent / "st"), "run", server + "/openapi.json", "--checks", checks,
                           "--max-examples", "10", "--seed", "1", "--workers", "2", "--request-timeout", "60",
                           "--generation-database", "none", "--no-color"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"(\d+) generated, \1 passed", proc.stdout), proc.stdout[-3000:]
