"""One loaded, verified, warmed model version: an ONNX Runtime session, its tokenizer and continuous
batching over the MLA KV cache (iteration-level scheduling as in Orca and vLLM). Torch-free.

A scheduler thread owns the session and the running batch (ORT's run releases the GIL, so the event
loop keeps serving while a step runs). Each iteration it admits waiting requests, prefills the newcomers
together (left-padded: the graph's positions are cumsum(mask) - 1, so padding does not change a row's
logits), merges their caches into the running batch by left-padding every cache to the longest, runs
one decode step for the whole batch, samples each row with its request's own RNG, streams the tokens
back and retires finished rows at once. `generate` (async) talks to it through a bounded waiting deque
and a per-request asyncio.Queue fed with `loop.call_soon_threadsafe`.

Admission across tenants (the app passes each request's tenant; the engine knows no keys or limits):
with fairness "vtc" it takes the oldest waiting request of the backlogged tenant with the smallest
virtual token counter (moeops.serve.tenants.VirtualTokenCounter, Sheng et al. OSDI 2024). While any
other tenant has demand (a request waiting or running, or one arrived in the last ACTIVE_WINDOW_S) a
tenant whose share of the recent service (decayed over ACTIVE_WINDOW_S) is above its max_share holds
at most ceil(max_share x max_batch) rows, so the rows it cannot take stay free for the
others' next requests (they start at once instead of waiting for a busy tenant's row to finish); with
no other demand it may use every row (work-conserving). Each tenant may hold at most its max_share of
max_waiting in the queue. fairness "fcfs" (the control) and no tenants keep arrival order.

Faults (chaos tests of a canary): a seeded fraction of requests fails at submit (InjectedFault), and a
latency factor f makes every ONNX Runtime call of the scheduler take f times as long.

Shapes: B batch rows, S new tokens in a step, P cached (past) positions, T = P + S, V vocab,
C kv latent dim, R rope dim.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeops.cli import UserError
from moeops.lineage import recorded_checksums, verify_checksums
from moeops.ort import first_line, io_names, ort_errors
from moeops.sampling import left_pad, sample_next
from moeops.serve import metrics
from moeops.serve.tenants import OUTPUT_COST, PROMPT_COST, VirtualTokenCounter

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PROVIDER = "CPUExecutionProvider"
# A prompt joins a prefill group while the group's padding stays under half its real tokens or under 32
# tokens: one ORT call for similar or short prompts (a call costs more than a few padded tokens), but a
# long prompt is not prefilled with short ones padded to its length.
PREFILL_PADDING_RATIO, PREFILL_PADDING_SLACK = 0.5, 32
# A tenant counts as having demand for this long after its last request arrived, so that a steady
# tenant's gaps between requests do not let a busy one take back every row just before the next arrives.
ACTIVE_WINDOW_S = 5.0
UNKNOWN_TENANT = (1.0, 1.0)  # (weight, max_share) of a tenant name the engine was not given


class EngineFull(Exception):
    """The waiting queue is full (the app answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InjectedFault(RuntimeError):
    """A request failed on purpose (fault_error_rate; the app answers 500)."""


class EngineClosed(Exception):
    """Draining, closed or not started (the app answers 503 with Retry-After)."""

    retry_after_s = 1.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int                 # new tokens; 0 = none (echo/prompt logprobs only)
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None         # per-request RNG: same seed -> same tokens, alone or batched
    stop: tuple[str, ...] = ()      # stop strings (may span tokens); text is cut before the stop string
    logprobs: int | None = None     # None = none; N >= 0: each token's logprob + top-N alternatives
    prompt_logprobs: bool = False   # logprobs of the prompt tokens (first token: None), with top-N if logprobs
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """One item of a request's stream. The EOS token that ends a sequence is in neither token_ids nor text."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None       # None while running; "stop" (EOS or stop string) | "length"
    prompt_logprobs: list[TokenLogprob | None] | None = None   # only on the first Delta when asked


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    rng: np.random.Generator
    arrival: float
    deadline: float
    tenant: str = ""
    cancelled: bool = False         # set by the consumer's side (aclose, timeout, loop gone)
    done: bool = False              # retired by the scheduler (counted out of in-flight)
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0                # characters of the decoded text already sent
    last_token_at: float = 0.0


# ----------------------------------------------------------------------------- pure helpers


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of the prompts, grouped for prefill (one ORT call per group), longest first."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and ((len(groups[-1]) + 1) * lengths[groups[-1][0]] - (real + lengths[i])
                       <= max(PREFILL_PADDING_RATIO * (real + lengths[i]), PREFILL_PADDING_SLACK)):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def merge_caches(parts: list[tuple[list[np.ndarray], np.ndarray]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Stack (cache, mask_BP) parts of different past lengths along the batch: each is left-padded with
    zeros and mask 0 to the longest, which the graph ignores."""
    P = max(mask_BP.shape[1] for _, mask_BP in parts)
    pad = [P - mask_BP.shape[1] for _, mask_BP in parts]
    mask_BP = np.concatenate([np.pad(m, ((0, 0), (p, 0))) for (_, m), p in zip(parts, pad)])
    cache = [np.concatenate([np.pad(c[i], ((0, 0), (p, 0), (0, 0))) for (c, _), p in zip(parts, pad)])
             for i in range(len(parts[0][0]))]
    return cache, mask_BP


def trim_padding(cache: list[np.ndarray], mask_BP: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Drop leading positions that are padding for every row (a long row left), so P stays the longest
    live sequence."""
    live_P = mask_BP.any(0)
    first = int(live_P.argmax()) if live_P.any() else mask_BP.shape[1]
    if first == 0:
        return cache, mask_BP
    return [c[:, first:] for c in cache], mask_BP[:, first:]


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to send yet: an incomplete UTF-8 sequence (decoded as U+FFFD,
    which the next token may complete) or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def stream_text(text: str, emitted: int, stop: tuple[str, ...], final: bool) -> tuple[str, int, bool]:
    """(text to send now, characters sent after it, whether a stop string ended the text). The text is
    cut before the earliest stop string."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        end = max(min(hits), emitted)
        return text[emitted:end], end, True
    end = max(len(text) - (0 if final else held_back(text, stop)), emitted)
    return text[emitted:end], end, False


def log_softmax(logits_V: np.ndarray) -> np.ndarray:
    z_V = logits_V.astype(np.float64)
    z_V -= z_V.max()
    return z_V - np.log(np.exp(z_V).sum())


def top_n(logprobs_V: np.ndarray, n: int) -> list[int]:
    if n <= 0:
        return []
    ids = np.argpartition(-logprobs_V, min(n, len(logprobs_V)) - 1)[:n]
    return [int(i) for i in ids[np.argsort(-logprobs_V[ids], kind="stable")]]


# ----------------------------------------------------------------------------- loading


def open_session(model: Path, sha256: str, cache_dir: Path | None, threads: int):
    """(ORT session, cache_hit). The graph ORT optimizes is cached as
    cache_dir/<sha256[:16]>-ort<version>-<EP>-<machine>.onnx (written under a temp name, then renamed)
    and every start, the first included, serves that file loaded with optimizations off, so a restart
    runs the same graph. The key names the machine because ORT_ENABLE_ALL's layout transforms are CPU
    specific (ORT warns so when it saves one). A cached file that does not load is rebuilt; a graph ORT
    cannot save (e.g. past protobuf's 2 GB) is served optimized in memory. One warning line each."""
    import onnxruntime as ort

    def session(path: Path, optimize: bool, save: Path | None = None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # ORT's idle workers spin between runs; here they would take the cores the event loop (HTTP, SSE)
        # needs between decode steps (measured under load: +25-30% output tokens/s at saturation without)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if save is not None:
            opts.optimized_model_filepath = str(save)
            opts.log_severity_level = 3  # the hardware-specific warning: the cache key names the machine
        return ort.InferenceSession(str(path), opts, providers=[PROVIDER])

    def original():
        try:
            return session(model, optimize=True)
        except ort_errors() as e:
            raise UserError(f"{model}: not a loadable ONNX model ({type(e).__name__}: {first_line(e)})") from None

    if cache_dir is None:
        return original(), False
    cached = Path(cache_dir) / f"{sha256[:16]}-ort{ort.__version__}-{PROVIDER}-{platform.machine()}.onnx"
    if cached.is_file():
        try:
            return session(cached, optimize=False), True
        except ort_errors() as e:
            log.warning("%s: cached optimized graph unusable (%s); rebuilding it", cached, first_line(e))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.", suffix=".tmp")
        os.close(fd)
        try:
            session(model, optimize=True, save=Path(tmp))
            os.replace(tmp, cached)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return session(cached, optimize=False), False
    except (*ort_errors(), OSError) as e:
        sess = original()
        log.warning("%s: optimized graph not cached (%s); serving %s optimized in memory", cached, first_line(e),
                    model)
        return sess, False


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        if not (isinstance(config["max_seq_len"], int) and isinstance(config["vocab_size"], int)):
            raise ValueError("max_seq_len and vocab_size must be integers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a model config ({first_line(e)})") from None
    return config


# ----------------------------------------------------------------------------- the engine


class Engine:
    def __init__(self, model_dir: Path, *, version: str, variant: str = "int8", max_batch: int = 16,
                 max_waiting: int = 64, request_timeout_s: float = 60.0, threads: int = 0,
                 cache_dir: Path | None = None, warmup: bool = True, scheduling: str = "continuous",
                 tenants: Mapping[str, tuple[float, float]] | None = None, fairness: str = "vtc",
                 fault_error_rate: float = 0.0, fault_latency_factor: float = 1.0):
        """tenants: name -> (weight, max_share); None = one queue in arrival order (no tenants)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if scheduling not in ("continuous", "static"):
            raise UserError(f"scheduling: {scheduling!r} is not continuous or static")
        if fairness not in ("vtc", "fcfs"):
            raise UserError(f"fairness: {fairness!r} is not vtc or fcfs")
        for name, (weight, share) in (tenants or {}).items():
            if not (weight > 0 and 0 < share <= 1):
                raise UserError(f"tenant {name}: weight must be > 0 and max_share in (0, 1]")
        if not (0 <= fault_error_rate <= 1 and fault_latency_factor >= 1):
            raise UserError("faults: error_rate must be in [0, 1] and latency_factor >= 1")
        if max_batch < 1 or max_waiting < 1 or request_timeout_s <= 0:
            raise UserError("max_batch, max_waiting and request_timeout_s must be positive")
        t0 = time.perf_counter()
        model_dir = Path(model_dir)
        verify_checksums(model_dir)
        self.sha256 = recorded_checksums(model_dir).get("model.onnx")
        if self.sha256 is None:
            raise UserError(f"{model_dir / 'lineage.json'}: checksums: model.onnx is not recorded")
        self.version, self.variant, self.scheduling = version, variant, scheduling
        self.max_batch, self.max_waiting, self.request_timeout_s = max_batch, max_waiting, request_timeout_s
        self._session, self.cache_hit = open_session(model_dir / "model.onnx", self.sha256, cache_dir, threads)
        shape = {i.name: i.shape for i in self._session.get_inputs()}
        n_layers = sum(n.startswith("past_latent.") for n in shape)
        self._inputs, self._outputs = io_names(n_layers)
        if not n_layers or set(self._inputs) != set(shape):
            raise UserError(f"{model_dir / 'model.onnx'}: not a moeops decoder (inputs {sorted(shape)})")
        self._dims = [shape[f"past_{kind}.{i}"][2] for i in range(n_layers) for kind in ("latent", "rope")]
        config = read_config(model_dir)
        self.max_seq_len, self.vocab_size = config["max_seq_len"], config["vocab_size"]
        try:
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a garbled file
            raise UserError(f"{model_dir / 'tokenizer.json'}: not a tokenizer ({first_line(e)})") from None
        self.eos_id = self.tokenizer.token_to_id(EOS_TOKEN)
        if self.eos_id is None:
            raise UserError(f"{model_dir / 'tokenizer.json'}: has no {EOS_TOKEN} token")
        self._token_texts: dict[int, str] = {}  # filled as logprobs name tokens (the whole vocab costs start time)
        self.ort_version, self.provider = ort.__version__, self._session.get_providers()[0]
        self.load_seconds = time.perf_counter() - t0
        self.fault_latency_factor = 1.0  # the real factor applies after warm-up
        t0 = time.perf_counter()
        if warmup:
            try:
                self._warm_up()
            except ort_errors() as e:
                raise UserError(f"{model_dir / 'model.onnx'}: ONNX Runtime cannot run it ({type(e).__name__}: "
                                f"{first_line(e)})") from None
        self.warmup_seconds = time.perf_counter() - t0 if warmup else 0.0
        self.fault_error_rate, self.fault_latency_factor = fault_error_rate, fault_latency_factor
        self._fault_rng = np.random.default_rng(0)

        self.tenants = dict(tenants) if tenants is not None else None
        self.fairness = fairness
        self._vtc = (VirtualTokenCounter({t: w for t, (w, _) in tenants.items()})
                     if tenants is not None and fairness == "vtc" else None)
        self._tenant_waiting: Counter[str] = Counter()  # waiting requests by tenant
        self._last_seen: dict[str, float] = {}          # tenant -> its last arrival (monotonic)
        self._recent: dict[str, tuple[float, float]] = {}  # tenant -> (service, when): decayed, scheduler thread
        self._m_tenant: dict[str, tuple] = {}           # tenant -> its metric children

        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._inflight = 0              # waiting + admitted, not yet retired
        self._admitting = False         # until start(); False again once draining or closed
        self._stop = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Request] = []  # the running batch, in cache row order
        self._cache: list[np.ndarray] = []
        self._mask_BP = np.zeros((0, 0), np.int64)
        self._next_B = np.zeros(0, np.int64)  # each row's last sampled token, fed at the next step
        self._outbox: list[tuple[_Request, object]] = []
        self._step_s, self._tokens_per_request = 0.01, 32.0  # moving averages for Retry-After

        m = version
        self._m_prompt, self._m_gen = metrics.PROMPT_TOKENS.labels(m), metrics.GENERATION_TOKENS.labels(m)
        self._m_ttft, self._m_itl = metrics.TIME_TO_FIRST_TOKEN.labels(m), metrics.INTER_TOKEN_LATENCY.labels(m)
        self._m_e2e, self._m_queue = metrics.REQUEST_DURATION.labels(m), metrics.QUEUE_TIME.labels(m)
        self._m_batch = metrics.BATCH_SIZE.labels(m)
        metrics.LOAD_SECONDS.labels(m).set(self.load_seconds)
        metrics.WARMUP_SECONDS.labels(m).set(self.warmup_seconds)
        metrics.MODEL_INFO.labels(m, variant, self.sha256).set(1)
        self._update_gauges()

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._stop:
                return
            self._admitting = True
            self._thread = threading.Thread(target=self._loop, name=f"engine-{self.version}", daemon=True)
            self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, tenant: str = "") -> AsyncIterator[Delta]:
        req = self._submit(prompt_ids, params, tenant)
        finished = False
        try:
            while True:
                try:
                    async with asyncio.timeout(req.deadline - time.monotonic()):
                        item = await req.queue.get()
                except TimeoutError:  # still queued or running: the finally below cancels it
                    raise TimeoutError(f"request not finished in {self.request_timeout_s:g} s") from None
                if isinstance(item, BaseException):  # the scheduler has already retired it
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._cancel(req)

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting),
                "kv_cache_bytes": sum(c.nbytes for c in self._cache)}

    def drain(self, timeout_s: float) -> bool:
        with self._cond:
            self._admitting = False
            return self._cond.wait_for(lambda: self._inflight == 0, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._stop, self._admitting = True, False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fail(list(self._waiting) + self._rows, EngineClosed(f"model version {self.version} was unloaded"))
        self._flush()
        self._waiting.clear()
        self._reset_batch()
        self._session = None
        metrics.forget(self.version)
        for tenant in self._m_tenant:
            for gauge in (metrics.TENANT_WAITING, metrics.TENANT_RUNNING):
                try:
                    gauge.remove(self.version, tenant)
                except KeyError:
                    pass

    # ------------------------------------------------------------------ the consumer's side (event loop)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, tenant: str = "") -> _Request:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt: empty (at least one token)")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt: token ids must be in 0..{self.vocab_size - 1}")
        if params.max_tokens < 0:
            raise ValueError(f"max_tokens: {params.max_tokens} is negative")
        if len(prompt) + (params.max_tokens > 0) > self.max_seq_len:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room for a new token in the model's context "
                             f"of {self.max_seq_len}" if params.max_tokens else
                             f"prompt: {len(prompt)} tokens exceed the model's context of {self.max_seq_len}")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if params.logprobs is not None and params.logprobs < 0:
            raise ValueError(f"logprobs: {params.logprobs} is negative")
        now = time.monotonic()
        req = _Request(prompt, params, tuple(s for s in params.stop if s), asyncio.get_running_loop(),
                       asyncio.Queue(), np.random.default_rng(params.seed), now, now + self.request_timeout_s, tenant)
        self._tenant_metrics(tenant)
        with self._cond:
            if not self._admitting:
                raise EngineClosed(f"model version {self.version} is not accepting requests (draining or closed)")
            if self.fault_error_rate and self._fault_rng.random() < self.fault_error_rate:
                raise InjectedFault(f"injected fault (model version {self.version}, error rate "
                                    f"{self.fault_error_rate:g})")
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are waiting", self._retry_after())
            if self._vtc is not None and self._tenant_waiting[tenant] >= self._waiting_cap(tenant):
                raise EngineFull(f"tenant {tenant}: {self._tenant_waiting[tenant]} requests are waiting (its share "
                                 "of the queue)", self._retry_after())
            self._waiting.append(req)
            self._tenant_waiting[tenant] += 1
            self._last_seen[tenant] = now
            if self._vtc is not None:
                self._vtc.enqueue(tenant)
            self._inflight += 1
            self._cond.notify_all()
        metrics.WAITING.labels(self.version).set(len(self._waiting))
        return req

    def _cancel(self, req: _Request) -> None:
        req.cancelled = True
        with self._cond:
            if req in self._waiting:  # never admitted: free its place in the queue now
                self._take_locked(req)
                self._retire_locked(req)
            self._cond.notify_all()

    def _retry_after(self) -> float:
        """Seconds until the queue has room, from the recent step time and tokens per request."""
        batches = len(self._waiting) / self.max_batch
        return float(max(1, math.ceil(batches * self._tokens_per_request * self._step_s)))

    def _share(self, tenant: str) -> float:
        return (self.tenants or {}).get(tenant, UNKNOWN_TENANT)[1]

    def _waiting_cap(self, tenant: str) -> int:
        return max(1, math.ceil(self._share(tenant) * self.max_waiting))

    def _row_cap(self, tenant: str) -> int:
        return max(1, math.ceil(self._share(tenant) * self.max_batch))

    # ------------------------------------------------------------------ admission (under self._cond)

    def _take_locked(self, req: _Request) -> None:
        self._waiting.remove(req)
        self._tenant_waiting[req.tenant] -= 1
        if self._vtc is not None:
            self._vtc.dequeue(req.tenant)

    def _admit_locked(self, room: int) -> list[_Request]:
        """Take up to `room` waiting requests into the batch: arrival order without fair scheduling;
        otherwise the oldest request of the eligible backlogged tenant with the smallest counter (ties:
        the tenant whose oldest request came first), its prompt charged at once. A tenant is eligible
        below its row cap, or above it while no other tenant has demand or while its share of the recent
        service is within its max_share (a light tenant's burst is not capped; a flooding one is)."""
        if self._vtc is None:
            newcomers = list(self._waiting)[:room]
            for r in newcomers:
                self._take_locked(r)
            return newcomers
        now = time.monotonic()
        running = Counter(r.tenant for r in self._rows)
        newcomers = []
        while len(newcomers) < room and self._waiting:
            heads: dict[str, _Request] = {}
            for r in self._waiting:
                heads.setdefault(r.tenant, r)
            eligible = [t for t in heads if running[t] < self._row_cap(t) or not self._others_active(t, running, now)
                        or self._recent_share(t, now) <= self._share(t)]
            tenant = self._vtc.pick(eligible)
            if tenant is None:  # only capped tenants wait: their rows stay free for the others' next requests
                break
            req = heads[tenant]
            self._take_locked(req)
            self._vtc.charge(tenant, prompt_tokens=len(req.prompt))
            self._serve(tenant, PROMPT_COST * len(req.prompt), now)
            running[tenant] += 1
            newcomers.append(req)
        return newcomers

    def _serve(self, tenant: str, service: float, now: float) -> None:
        """Count service (VTC's units) into the tenant's recent total, decayed over ACTIVE_WINDOW_S."""
        total, at = self._recent.get(tenant, (0.0, now))
        self._recent[tenant] = (total * math.exp((at - now) / ACTIVE_WINDOW_S) + service, now)

    def _recent_share(self, tenant: str, now: float) -> float:
        """The tenant's share of the service all tenants got recently (decayed over ACTIVE_WINDOW_S)."""
        recent = {t: total * math.exp((at - now) / ACTIVE_WINDOW_S) for t, (total, at) in self._recent.items()}
        everyone = sum(recent.values())
        return recent.get(tenant, 0.0) / everyone if everyone else 0.0

    def _others_active(self, tenant: str, running: Counter, now: float) -> bool:
        return any(u != tenant and (self._tenant_waiting[u] or running[u] or now - seen < ACTIVE_WINDOW_S)
                   for u, seen in self._last_seen.items())

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._waiting or self._rows)
                if self._stop:
                    return
                room = self.max_batch - len(self._rows)
                if self.scheduling == "static" and self._rows:
                    room = 0  # a static batch runs to completion before the next one forms
                newcomers = self._admit_locked(room)
            try:
                self._iterate(newcomers)
            except Exception as e:  # a bug must not kill the thread: fail what is in flight, keep serving
                log.exception("engine %s: step failed", self.version)
                self._fail(newcomers + self._rows, e)
                self._reset_batch()
            self._flush()
            self._update_gauges()

    def _iterate(self, newcomers: list[_Request]) -> None:
        now = time.monotonic()
        keep = [b for b, r in enumerate(self._rows) if self._alive(r, now)]
        if len(keep) < len(self._rows):
            self._select(keep)
        newcomers = [r for r in newcomers if self._alive(r, now)]
        parts = []
        for group in prefill_groups([len(r.prompt) for r in newcomers]):
            reqs = [newcomers[i] for i in group]
            try:
                parts.append(self._prefill(reqs))
            except Exception as e:
                self._fail(reqs, e)
            self._flush()  # each group's first tokens out at once, not after the other groups' prefill
        parts = [p for p in parts if p[0]]
        if parts:
            if self._rows:
                parts.insert(0, (self._rows, self._cache, self._mask_BP, self._next_B))
            cache, mask_BP = merge_caches([(c, m) for _, c, m, _ in parts])
            self._rows = [r for rows, *_ in parts for r in rows]
            self._next_B = np.concatenate([n for *_, n in parts])
            self._cache, self._mask_BP = trim_padding(cache, mask_BP)
        if self._rows:
            try:
                self._decode()
            except Exception as e:
                self._fail(self._rows, e)
                self._reset_batch()

    def _alive(self, req: _Request, now: float) -> bool:
        if req.cancelled:
            self._retire(req)
            return False
        if now > req.deadline:
            self._outbox.append((req, TimeoutError(f"request not finished in {self.request_timeout_s:g} s")))
            self._retire(req)
            return False
        return True

    def _run(self, ids_BS: np.ndarray, mask_BT: np.ndarray, past: list[np.ndarray]):
        feed = dict(zip(self._inputs, [ids_BS, mask_BT, *past]))
        t0 = time.perf_counter()
        logits_BSV, *present = self._session.run(self._outputs, feed)
        if self.fault_latency_factor > 1:  # injected slowness: this call takes factor x as long
            time.sleep((self.fault_latency_factor - 1) * (time.perf_counter() - t0))
        return logits_BSV, present

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, 0, d), np.float32) for d in self._dims]

    def _prefill(self, reqs: list[_Request]):
        """Prefill `reqs` in one call; their first tokens go out. Returns the part that continues:
        (requests, cache, mask_BS, next token per row)."""
        now = time.monotonic()
        for r in reqs:
            self._m_queue.observe(now - r.arrival)
            self._m_prompt.inc(len(r.prompt))
            self._m_tenant[r.tenant][0].inc(len(r.prompt))
        ids_BS, mask_BS = left_pad([r.prompt for r in reqs])
        logits_BSV, present = self._run(ids_BS, mask_BS, self._empty_cache(len(reqs)))
        S = ids_BS.shape[1]
        keep, next_tokens = [], []
        for b, r in enumerate(reqs):
            prompt_lp = self._prompt_logprobs(r, logits_BSV[b, S - len(r.prompt):]) \
                if r.params.prompt_logprobs else None
            if r.params.max_tokens == 0:
                self._outbox.append((r, Delta([], "", [], "length", prompt_lp)))
                self._finish(r)
                continue
            token = self._next_token(r, logits_BSV[b, -1], prompt_lp)
            if token is not None:
                keep.append(b)
                next_tokens.append(token)
        return ([reqs[b] for b in keep], [c[keep] for c in present], mask_BS[keep],
                np.array(next_tokens, np.int64))

    def _decode(self) -> None:
        B = len(self._rows)
        self._m_batch.observe(B)
        mask_BT = np.concatenate([self._mask_BP, np.ones((B, 1), np.int64)], axis=1)
        t0 = time.perf_counter()
        logits_B1V, self._cache = self._run(self._next_B[:, None], mask_BT, self._cache)
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - t0)
        self._mask_BP = mask_BT
        keep = []
        for b, r in enumerate(self._rows):
            token = self._next_token(r, logits_B1V[b, 0])
            if token is not None:
                self._next_B[b] = token
                keep.append(b)
        if len(keep) < B:
            self._select(keep)

    def _next_token(self, r: _Request, logits_V: np.ndarray, prompt_lp=None) -> int | None:
        """Sample and send a row's next token; the token to feed next, or None when the sequence ended."""
        p = r.params
        token = int(sample_next(logits_V[None], p.temperature, p.top_p, r.rng)[0])
        now = time.monotonic()
        if r.last_token_at:
            self._m_itl.observe(now - r.last_token_at)
        else:
            self._m_ttft.observe(now - r.arrival)
            self._m_tenant[r.tenant][2].observe(now - r.arrival)
        r.last_token_at = now
        eos = token == self.eos_id and not p.ignore_eos
        finish = "stop" if eos else None
        if not eos:
            r.tokens.append(token)
            self._m_gen.inc()
            self._m_tenant[r.tenant][1].inc()
            if self._vtc is not None:
                self._vtc.charge(r.tenant, output_tokens=1)
                self._serve(r.tenant, OUTPUT_COST, now)
            if len(r.tokens) >= p.max_tokens or len(r.prompt) + len(r.tokens) >= self.max_seq_len:
                finish = "length"
        text = self.tokenizer.decode(r.tokens)
        piece, r.emitted, stopped = stream_text(text, r.emitted, r.stop, final=finish is not None)
        finish = "stop" if stopped else finish
        lps = [] if eos or p.logprobs is None else [self._logprob(log_softmax(logits_V), token, p.logprobs)]
        self._outbox.append((r, Delta([] if eos else [token], piece, lps, finish, prompt_lp)))
        if finish is not None:
            self._finish(r)
            return None
        return token

    def _token_text(self, token: int) -> str:
        """What a token reads as on its own in logprobs (a byte of a multi-byte character reads as U+FFFD)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _logprob(self, logprobs_V: np.ndarray, token: int, n: int) -> TokenLogprob:
        top = [(self._token_text(i), float(logprobs_V[i])) for i in top_n(logprobs_V, n)]
        return TokenLogprob(token, self._token_text(token), float(logprobs_V[token]), top)

    def _prompt_logprobs(self, r: _Request, logits_SV: np.ndarray) -> list[TokenLogprob | None]:
        """Position i's logits predict prompt token i + 1; the first token has none."""
        n = r.params.logprobs or 0
        return [None] + [self._logprob(log_softmax(logits_SV[i]), r.prompt[i + 1], n)
                         for i in range(len(r.prompt) - 1)]

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch (retired rows' caches go at once)."""
        if not keep:
            self._reset_batch()
            return
        self._rows = [self._rows[b] for b in keep]
        self._next_B = self._next_B[keep]
        self._cache, self._mask_BP = trim_padding([c[keep] for c in self._cache], self._mask_BP[keep])

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask_BP, self._next_B = [], [], np.zeros((0, 0), np.int64), np.zeros(0, np.int64)

    def _finish(self, r: _Request) -> None:
        self._m_e2e.observe(time.monotonic() - r.arrival)
        self._tokens_per_request = 0.9 * self._tokens_per_request + 0.1 * max(len(r.tokens), 1)
        self._retire(r)

    def _fail(self, reqs: list[_Request], e: BaseException) -> None:
        if not isinstance(e, EngineClosed):
            log.warning("engine %s: %d request(s) failed: %s: %s", self.version, len(reqs), type(e).__name__,
                        first_line(e))
            e = RuntimeError(f"the model failed to run ({type(e).__name__}: {first_line(e)})")
        for r in reqs:
            if not r.done:
                self._outbox.append((r, e))
                self._retire(r)

    def _retire(self, r: _Request) -> None:
        with self._cond:
            self._retire_locked(r)

    def _retire_locked(self, r: _Request) -> None:
        if not r.done:
            r.done = True
            self._inflight -= 1
            self._cond.notify_all()

    def _flush(self) -> None:
        """Hand the collected deltas to their event loops: one thread-safe call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, object]]] = {}
        for r, item in self._outbox:
            by_loop.setdefault(r.loop, []).append((r, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                for r, _ in items:
                    r.cancelled = True

    def _update_gauges(self) -> None:
        metrics.RUNNING.labels(self.version).set(len(self._rows))
        metrics.WAITING.labels(self.version).set(len(self._waiting))
        metrics.KV_CACHE_BYTES.labels(self.version).set(sum(c.nbytes for c in self._cache))
        running = Counter(r.tenant for r in self._rows)
        for tenant in list(self._m_tenant):
            metrics.TENANT_WAITING.labels(self.version, tenant).set(self._tenant_waiting[tenant])
            metrics.TENANT_RUNNING.labels(self.version, tenant).set(running[tenant])

    def _tenant_metrics(self, tenant: str) -> None:
        if tenant not in self._m_tenant:  # the label set is the app's fixed tenant names (or "")
            self._m_tenant[tenant] = (metrics.TENANT_PROMPT_TOKENS.labels(tenant),
                                      metrics.TENANT_GENERATION_TOKENS.labels(tenant),
                                      metrics.TENANT_TIME_TO_FIRST_TOKEN.labels(tenant))

    def _warm_up(self) -> None:
        """Run the shapes serving will: prefill of a short and a long prompt at batch 1 and max_batch, and
        decode steps at batch 1, 2, 4, ... max_batch (first runs size ORT's arena and thread pool)."""
        short, long = min(8, self.max_seq_len - 1), min(64, self.max_seq_len - 1)
        for B in sorted({1, self.max_batch}):
            for S in (short, long):
                self._run(np.ones((B, S), np.int64), np.ones((B, S), np.int64), self._empty_cache(B))
        sizes = sorted({min(2 ** k, self.max_batch) for k in range(self.max_batch.bit_length() + 1)})
        for B in sizes:
            past = [np.zeros((B, long, d), np.float32) for d in self._dims]
            for _ in range(2):
                self._run(np.ones((B, 1), np.int64), np.ones((B, long + 1), np.int64), past)


def _deliver(items: list[tuple[_Request, object]]) -> None:
    for r, item in items:
        r.queue.put_nowait(item)
