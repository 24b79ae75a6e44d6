"""Tenants of a shared server: API keys (stored as sha256, never the key), rate limits, and the fair-share
counter the engine's admission asks. Torch-free.

tenants.yaml (path in params serve.tenants):

    tenants:
      - name: team-a                 # the `tenant` label of the metrics (a fixed set)
        key_sha256: 9f86d0...        # `echo -n KEY | python -m moeops.serve.tenants hash-key`
        weight: 1.0                  # fair share relative to the other tenants
        requests_per_minute: 600     # 0 = unlimited
        tokens_per_minute: 100000    # prompt + max new tokens, counted at admission; 0 = unlimited
        max_concurrent: 32           # requests in flight; 0 = unlimited
        max_share: 0.3               # most of the running batch while other tenants have demand

The rate limits are token buckets (capacity one minute's worth, refilled continuously), so a burst of a
minute's quota passes at once and the Retry-After of a refusal is the time until the bucket holds enough.

The fair-share counter is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI 2024): each tenant's counter grows by the service it received (prompt tokens + 2 x output
tokens) divided by its weight; the engine admits the oldest request of the backlogged tenant with the
smallest counter. A tenant that becomes backlogged again is lifted to the smallest counter of the
backlogged tenants (or, when none is, to the counter of the last one that left), so idle time is not
banked into a later burst.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeops.cli import UserError
from moeops.serve import metrics

PROMPT_COST, OUTPUT_COST = 1.0, 2.0  # VTC service per prompt token and per generated token (Sheng et al.)


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    weight: float = 1.0
    requests_per_minute: int = 0  # 0 = unlimited
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    max_share: float = 0.3


class _TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    key_sha256: str
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    requests_per_minute: int = Field(0, ge=0)
    tokens_per_minute: int = Field(0, ge=0)
    max_concurrent: int = Field(0, ge=0)
    max_share: float = Field(0.3, gt=0, le=1)

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be the 64 hex digits of the key's sha256 (never the key itself)")
        return v.lower()


class _TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[_TenantSpec] = Field(min_length=1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_tenants(path: str | Path) -> dict[str, Tenant]:
    """tenants.yaml -> {name: Tenant}; UserError (one line naming the file and the field) on any problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    try:
        spec = _TenantsFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "top level"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise UserError(f"{path}: {loc}: {msg}") from None
    tenants: dict[str, Tenant] = {}
    hashes: dict[str, str] = {}
    for i, t in enumerate(spec.tenants):
        if t.name in tenants:
            raise UserError(f"{path}: tenants[{i}].name: {t.name!r} is a duplicate")
        if t.key_sha256 in hashes:
            raise UserError(f"{path}: tenants[{i}].key_sha256: the same key as tenant {hashes[t.key_sha256]!r}")
        tenants[t.name] = Tenant(**t.model_dump())
        hashes[t.key_sha256] = t.name
    return tenants


class RateLimited(Exception):
    """Over a tenant's limit (the app answers 429 with Retry-After; hard: this request can never pass, so
    x-should-retry: false)."""

    def __init__(self, message: str, limit: str, retry_after_s: float, hard: bool = False):
        super().__init__(message)
        self.limit, self.retry_after_s, self.hard = limit, retry_after_s, hard


class _Bucket:
    """A token bucket holding up to `per_minute`, refilled at per_minute / 60 per second."""

    def __init__(self, per_minute: int, now: float):
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level, self.updated = self.capacity, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is in the bucket (0 = now)."""
        return max(0.0, (amount - self.level) / self.rate)


class Tenants:
    """Authentication and rate limits of a fixed set of tenants. Called on the event loop; a lock makes
    it safe from any thread."""

    def __init__(self, tenants: dict[str, Tenant]):
        self.tenants = dict(tenants)
        self._lock = threading.Lock()
        now = time.monotonic()
        self._rpm = {n: _Bucket(t.requests_per_minute, now) for n, t in tenants.items() if t.requests_per_minute}
        self._tpm = {n: _Bucket(t.tokens_per_minute, now) for n, t in tenants.items() if t.tokens_per_minute}
        self._concurrent = {n: 0 for n in tenants}
        self._hashes = [(t.key_sha256.encode(), t) for t in tenants.values()]

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant whose key this is, or None. Every tenant's hash is compared in constant time, so the
        time taken says nothing about which one (or how much of one) matched."""
        digest = hash_key(api_key or "").encode()
        found = None
        for key_hash, tenant in self._hashes:
            if hmac.compare_digest(digest, key_hash) and api_key:
                found = tenant
        return found

    def admit(self, tenant: Tenant, tokens: int) -> None:
        """Count one request of `tokens` (prompt + max new tokens) against the tenant's limits, or raise
        RateLimited (counted in moeops_rate_limited_total) and count nothing. Every admitted request is
        followed by one release()."""
        name = tenant.name
        with self._lock:
            now = time.monotonic()
            if tenant.tokens_per_minute and tokens > tenant.tokens_per_minute:
                self._refuse(name, "tokens_per_minute", 0.0, True,
                             f"tenant {name}: {tokens} tokens exceed its whole quota of {tenant.tokens_per_minute} "
                             "tokens per minute")
            if tenant.max_concurrent and self._concurrent[name] >= tenant.max_concurrent:
                self._refuse(name, "max_concurrent", 1.0, False,
                             f"tenant {name}: {tenant.max_concurrent} requests are already in flight")
            rpm, tpm = self._rpm.get(name), self._tpm.get(name)
            for bucket in (rpm, tpm):
                if bucket is not None:
                    bucket.refill(now)
            if rpm is not None and rpm.wait_s(1) > 0:
                self._refuse(name, "requests_per_minute", rpm.wait_s(1), False,
                             f"tenant {name}: over {tenant.requests_per_minute} requests per minute")
            if tpm is not None and tpm.wait_s(tokens) > 0:
                self._refuse(name, "tokens_per_minute", tpm.wait_s(tokens), False,
                             f"tenant {name}: over {tenant.tokens_per_minute} tokens per minute")
            if rpm is not None:
                rpm.level -= 1
            if tpm is not None:
                tpm.level -= tokens
            self._concurrent[name] += 1

    def release(self, tenant: Tenant) -> None:
        with self._lock:
            self._concurrent[tenant.name] = max(0, self._concurrent[tenant.name] - 1)

    @staticmethod
    def _refuse(name: str, limit: str, wait_s: float, hard: bool, message: str):
        metrics.RATE_LIMITED.labels(name, limit).inc()
        raise RateLimited(message, limit, 60.0 if hard else max(1.0, float(math.ceil(wait_s))), hard)


class VirtualTokenCounter:
    """The fair-share counters (see the module doc). The engine tells it when a tenant's waiting count
    changes (enqueue / dequeue) and what service each tenant got (charge); `pick` orders the candidates.
    Thread-safe: the event loop enqueues, the scheduler thread charges."""

    def __init__(self, weights: Mapping[str, float]):
        self._weights = dict(weights)
        self._counter: dict[str, float] = {t: 0.0 for t in weights}
        self._waiting: dict[str, int] = {}
        self._last_left: str | None = None
        self._lock = threading.Lock()

    def counter(self, tenant: str) -> float:
        return self._counter.get(tenant, 0.0)

    def backlogged(self) -> list[str]:
        with self._lock:
            return [t for t, n in self._waiting.items() if n]

    def enqueue(self, tenant: str) -> None:
        with self._lock:
            if not self._waiting.get(tenant):  # becomes backlogged: lift, so idle time is not banked
                others = [self._counter[t] for t, n in self._waiting.items() if n]
                floor = min(others) if others else self._counter.get(self._last_left, 0.0)
                self._counter[tenant] = max(self._counter.get(tenant, 0.0), floor)
            self._waiting[tenant] = self._waiting.get(tenant, 0) + 1

    def dequeue(self, tenant: str) -> None:
        with self._lock:
            self._waiting[tenant] -= 1
            if not self._waiting[tenant]:
                self._last_left = tenant

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        with self._lock:
            service = PROMPT_COST * prompt_tokens + OUTPUT_COST * output_tokens
            self._counter[tenant] = self._counter.get(tenant, 0.0) + service / self._weights.get(tenant, 1.0)

    def pick(self, candidates: Iterable[str]) -> str | None:
        """The candidate with the smallest counter (ties: the first given), None for no candidates."""
        with self._lock:
            return min(candidates, key=lambda t: self._counter.get(t, 0.0), default=None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["hash-key"]:
        print("usage: python -m moeops.serve.tenants hash-key  < key   (prints the sha256 for tenants.yaml)",
              file=sys.stderr)
        return 2
    key = sys.stdin.read().rstrip("\r\n")
    if not key:
        print("hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
