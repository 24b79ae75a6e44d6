"""The canary in the server and its tenants (issue 12 §1, §3): champion and challenger side by side, a weighted,
sticky share of the callers to the challenger (set through the registry's aliases file), the version on every
response and in the metrics, reject and promote under load without a failed request; API keys (401) and rate
limits (429, Retry-After, x-should-retry). One real `moeops serve` for the whole file, on a private copy of the
session's served registry (v1 champion, v2 challenger), with a tenants.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml
from conftest import stage_env, start_server, stop_server, wait_for

from moeops import registry
from moeops.serve.router import sticky_point
from moeops.serve.tenants import hash_key

MODEL = "moeops"
KEYS = {"team-a": "key-a", "slow": "key-slow", "small": "key-small"}
FAULTY = "v4"  # MOEOPS_FAULTS fails every request of this version (registered by the last test)


@pytest.fixture(scope="module")
def canary(served_registry, tmp_path_factory) -> dict:
    """{url, root, name, workdir}: the server follows the copied registry's aliases every 0.2 s."""
    base = tmp_path_factory.mktemp("canary")
    root = base / "registry"
    shutil.copytree(served_registry["root"], root)
    tenants = {"tenants": [
        {"name": "team-a", "key_sha256": hash_key(KEYS["team-a"])},
        {"name": "slow", "key_sha256": hash_key(KEYS["slow"]), "requests_per_minute": 2},
        {"name": "small", "key_sha256": hash_key(KEYS["small"]), "tokens_per_minute": 60, "max_concurrent": 1},
    ]}
    (base / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    reg = {**served_registry, "root": root}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEOPS_FAULTS", json.dumps({FAULTY: {"error_rate": 1.0, "latency_factor": 2.0}}))
        proc, url = start_server(reg, base / "srv", tenants=str(base / "tenants.yaml"))
    yield {"url": url, "root": root, "name": served_registry["name"], "workdir": base / "srv",
           "variant": served_registry["versions"]["v2"], "tokenizer": served_registry["tokenizer"]}
    assert stop_server(proc) == 0


def client(url: str, tenant: str = "team-a", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[tenant], timeout=60, **{"max_retries": 0, **kw})


def version_info(url: str) -> dict:
    return httpx.get(url + "/version", timeout=10).json()


def routing(url: str) -> tuple[str | None, float]:
    v = version_info(url)
    return v["challenger"], v["challenger_weight"]


def set_weight(canary: dict, weight: float) -> str:
    """Through the registry (as the rollout flow does); returns the challenger once the server applies it."""
    challenger = registry.set_challenger_weight(canary["root"], canary["name"], weight, "test: canary weight")
    wait_for(lambda: routing(canary["url"]) == (challenger, weight), what=f"the server to route {weight}")
    return challenger


def ensure_challenger(canary: dict, version: str | None = None) -> str:
    """A loaded challenger: the registry's, or newly registered versions (v2's files) until there is one (until
    it is `version`)."""
    aliases = json.loads((canary["root"] / "aliases" / f"{canary['name']}.json").read_text())
    challenger = aliases["challenger"]
    while challenger is None or version is not None and challenger != version:
        assert version is None or challenger is None or int(challenger[1:]) < int(version[1:]), challenger
        challenger = registry.register(canary["root"], canary["name"],
                                       {"onnx/int8": canary["variant"], "tokenizer.json": canary["tokenizer"]},
                                       {"test": "canary"}, {"candidate": "onnx_int8"}, "test: a new challenger")
    wait_for(lambda: version_info(canary["url"])["challenger"] == challenger, what=f"challenger {challenger} loaded")
    return challenger


def complete(c: openai.OpenAI, user: str | None = None, **kw) -> tuple[str, str]:
    """(x-moeops-model-version, system_fingerprint) of one short completion."""
    raw = c.completions.with_raw_response.create(model=MODEL, prompt="def f(", max_tokens=1, temperature=0,
                                                 **({"user": user} if user else {}), **kw)
    return raw.headers["x-moeops-model-version"], raw.parse().system_fingerprint


def samples(url: str, name: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def requests_total(url: str) -> dict[tuple[str, str, str], float]:
    """moeops_requests_total by (model_version, status, tenant)."""
    return {(s.labels["model_version"], s.labels["status"], s.labels["tenant"]): s.value
            for s in samples(url, "moeops_requests_total")}


def loaded_versions(url: str) -> set[str]:
    return {s.labels["model_version"] for s in samples(url, "moeops_model_info")}


class Load:
    """Client threads sending completions back to back (every other one streamed), each as its own users,
    until stopped; every failure is kept. The versions that answered are counted from the header."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.stop, self.errors, self.versions = url, threading.Event(), [], []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {KEYS['team-a']}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {"model": MODEL, "prompt": "import os", "max_tokens": 3, "temperature": 0,
                        "user": f"load-{i}-{n}", "stream": n % 2 == 0}
                try:
                    r = http.post("/v1/completions", json=body)
                    if r.status_code != 200 or (body["stream"] and "[DONE]" not in r.text) or '"error"' in r.text:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                    self.versions.append(r.headers.get("x-moeops-model-version"))
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def served(self, at_least: int, timeout_s: float = 60.0) -> None:
        start = len(self.versions)
        wait_for(lambda: len(self.versions) >= start + at_least, timeout_s, f"{at_least} more requests answered")


# ----------------------------------------------------------------- routing


def test_weighted_sticky_routing_and_the_version_on_every_answer(canary):
    url = canary["url"]
    c = client(url)
    challenger = set_weight(canary, 0.3)
    before = requests_total(url)
    users = [f"user-{i}" for i in range(60)]
    answers = {u: complete(c, u) for u in users}
    to_challenger = {u for u, (v, _) in answers.items() if v == challenger}
    # the share is the weight (within tolerance), and exactly the callers whose tenant+user hashes below it
    assert 0.15 <= len(to_challenger) / len(users) <= 0.45, len(to_challenger)
    assert to_challenger == {u for u in users if sticky_point(f"team-a\0{u}") < 0.3}
    assert {v for v, _ in answers.values()} == {"v1", challenger}
    assert all(fp == f"{MODEL}@{v}" for v, fp in answers.values())  # the header names the engine that answered
    # sticky: the same caller always gets the same version (user field or the session header)
    for u in users[:6]:
        assert {complete(c, u)[0] for _ in range(3)} == {answers[u][0]}
    session = [c.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1,
                                                      extra_headers={"x-moeops-session": "s-1"})
               .headers["x-moeops-model-version"] for _ in range(4)]
    assert len(set(session)) == 1
    # the metrics label is the answering version (and the tenant), request for request
    after = requests_total(url)
    by_version = {v: sum(1 for x, _ in answers.values() if x == v) + 3 * sum(1 for u in users[:6] if answers[u][0] == v)
                  + session.count(v) for v in ("v1", challenger)}
    for v, n in by_version.items():
        assert after.get((v, "200", "team-a"), 0) - before.get((v, "200", "team-a"), 0) == n
    # pinned to a version: that engine, whatever the weight
    pinned = c.completions.with_raw_response.create(model=f"{MODEL}@{challenger}", prompt="x", max_tokens=1)
    assert pinned.headers["x-moeops-model-version"] == challenger
    assert [m.id for m in c.models.list().data] == [MODEL, f"{MODEL}@v1", f"{MODEL}@{challenger}"]


def test_weight_zero_sends_nobody_to_the_challenger(canary):
    c = client(canary["url"])
    set_weight(canary, 0.0)
    assert {complete(c, f"user-{i}")[0] for i in range(30)} == {"v1"}
    # an error after the version was chosen names it too (the prompt does not fit the context)
    r = httpx.post(canary["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEYS['team-a']}"},
                   json={"model": MODEL, "prompt": "x " * 400, "max_tokens": 1})
    assert r.status_code == 400 and r.headers["x-moeops-model-version"] == "v1"


def test_reject_retires_the_challenger_without_a_failed_request(canary):
    url = canary["url"]
    challenger = ensure_challenger(canary)
    set_weight(canary, 0.5)
    with Load(url) as load:
        wait_for(lambda: challenger in load.versions, what="the challenger to answer under load")
        registry.reject(canary["root"], canary["name"], challenger, "test: canary failed")
        wait_for(lambda: version_info(url)["challenger"] is None, what="the challenger retired")
        n = len(load.versions) + len(load.threads)  # answers after n were all routed after the reject
        load.served(15)
    assert not load.errors, load.errors[:5]
    assert set(load.versions[n:]) == {"v1"}  # nobody routed to the rejected version any more
    wait_for(lambda: challenger not in loaded_versions(url), what=f"{challenger} closed")
    assert version_info(url)["challenger_weight"] == 0.0


def test_promote_makes_the_loaded_challenger_champion_without_a_failed_request(canary):
    url = canary["url"]
    challenger = ensure_challenger(canary)
    set_weight(canary, 0.5)
    champion = version_info(url)["version"]
    with Load(url) as load:
        wait_for(lambda: challenger in load.versions and champion in load.versions, what="both versions answering")
        registry.promote(canary["root"], canary["name"], challenger, "test: canary passed")
        wait_for(lambda: version_info(url)["version"] == challenger, what=f"{challenger} champion")
        n = len(load.versions) + len(load.threads)
        load.served(15)
    assert not load.errors, load.errors[:5]
    assert set(load.versions[n:]) == {challenger}
    assert (version_info(url)["challenger"], version_info(url)["challenger_weight"]) == (None, 0.0)
    wait_for(lambda: loaded_versions(url) == {challenger}, what=f"{champion} closed")
    log = (canary["workdir"] / "server.log").read_text()
    assert f"now serving {challenger} (was {champion}; promoted the loaded challenger)" in log  # no reload


# ----------------------------------------------------------------- tenants


def test_api_keys(canary):
    url = canary["url"]
    before = requests_total(url)
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="key-a2", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert requests_total(url).get(("none", "401", ""), 0) - before.get(("none", "401", ""), 0) == 3
    for path in ("/health/live", "/health/ready", "/version", "/metrics"):  # probes and scrapes need no key
        assert httpx.get(url + path).status_code == 200, path
    assert client(url).models.list().data  # the right key
    schema = httpx.get(url + "/openapi.json").json()  # the documented key
    op = schema["paths"]["/v1/completions"]["post"]
    assert op["security"] == [{"bearer": []}] and "401" in op["responses"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_no_prompt_output_or_key_in_the_log(canary):
    """Tenants never see each other's data in the server's log: prompts, outputs and keys are never written."""
    secret, stranger = "zqx private prompt 4711", "not-a-key-9931"
    text = client(canary["url"]).completions.create(model=MODEL, prompt=secret, max_tokens=8, seed=0).choices[0].text
    r = httpx.post(canary["url"] + "/v1/completions", json={"model": MODEL, "prompt": secret},
                   headers={"Authorization": f"Bearer {stranger}"})
    assert r.status_code == 401
    log = (canary["workdir"] / "server.log").read_text()
    assert "moeops serve: ready" in log  # the log is the server's, and written
    for private in (secret, KEYS["team-a"], stranger) + ((text,) if len(text.strip()) >= 8 else ()):
        assert private not in log, private


def test_rate_limits(canary):
    url = canary["url"]
    slow = client(url, "slow")  # 2 requests per minute
    for _ in range(2):
        complete(slow)
    with pytest.raises(openai.RateLimitError) as e:
        complete(slow)
    r = e.value.response
    assert e.value.code == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    assert "x-should-retry" not in r.headers  # it will pass later
    # a request larger than the tenant's whole token quota can never pass: the client must not retry it
    small = client(url, "small", max_retries=2)

    def refusals() -> float:
        return sum(s.value for s in samples(url, "moeops_rate_limited_total")
                   if s.labels == {"tenant": "small", "limit": "tokens_per_minute"})

    n = refusals()
    with pytest.raises(openai.RateLimitError) as e:
        small.completions.create(model=MODEL, prompt="x", max_tokens=80)
    assert e.value.response.headers["x-should-retry"] == "false" and e.value.code == "rate_limit_exceeded"
    assert refusals() == n + 1  # one request: the openai client obeyed x-should-retry
    # max_concurrent 1: each of these passes only if the one before was released when it ended (streamed too);
    # the release runs just after the last byte went out, so a client as quick as this one may be refused once
    def soon(request):
        for _ in range(50):
            try:
                return request()
            except openai.RateLimitError:
                time.sleep(0.1)
        raise AssertionError("a request of a tenant with nothing in flight is still refused: a leaked admission")

    assert soon(lambda: complete(small))[0]
    assert soon(lambda: list(small.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True)))
    assert soon(lambda: complete(small))[0]


def test_an_injected_fault_is_a_500_of_its_version(canary):
    """MOEOPS_FAULTS makes FAULTY fail every request: a 500 that still names the version, counted under it."""
    url = canary["url"]
    ensure_challenger(canary, FAULTY)
    before = requests_total(url)
    with pytest.raises(openai.InternalServerError) as e:
        client(url).completions.create(model=f"{MODEL}@{FAULTY}", prompt="x", max_tokens=1)
    assert e.value.response.headers["x-moeops-model-version"] == FAULTY
    after = requests_total(url)
    assert after[(FAULTY, "500", "team-a")] - before.get((FAULTY, "500", "team-a"), 0) == 1


@pytest.mark.parametrize("faults, tenants, message", [
    ("{v2: 1}", None, "error: MOEOPS_FAULTS: not JSON"),
    ('{"v2": {"error_rate": 2}}', None, "error: MOEOPS_FAULTS: v2.error_rate: expected a number in [0, 1], got 2"),
    ("", "tenants: []\n", "error: tenants.yaml: tenants: List should have at least 1 item"),
])
def test_bad_faults_or_tenants_exit_2_before_binding(tmp_path, faults, tenants, message):
    serve = "serve:\n  port: 1\n"  # never bound: the process must fail before it listens
    if tenants is not None:
        (tmp_path / "tenants.yaml").write_text(tenants)
        serve += "  tenants: tenants.yaml\n"
    (tmp_path / "params.yaml").write_text(serve)
    proc = subprocess.run([sys.executable, "-m", "moeops", "serve", "--params", "params.yaml"], cwd=tmp_path,
                          env={**stage_env(), "MOEOPS_FAULTS": faults}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
