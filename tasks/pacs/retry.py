"""Retries with backoff for a PACS that is down or slow, then an error that names the server.

Every message here names the server and the kind of request, never a UID, an accession
number or a URL path (which holds UIDs): they reach logs, Prefect and exceptions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from configs import RetryConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class PacsUnavailable(RuntimeError):
    """The PACS did not answer after every retry: the message names it and what was asked."""


class PacsRefused(RuntimeError):
    """The PACS refused medxfer itself (credentials, an AE title it does not know, TLS): no
    retry can help, and the message says what a site must fix."""


class Transient(Exception):
    """A failure worth retrying: connection refused or reset, a timeout, HTTP 408/429/5xx,
    an association the PACS could not take now. `detail` is one line, without identifiers."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    backoff_seconds: float
    max_backoff_seconds: float

    @classmethod
    def from_config(cls, config: RetryConfig) -> RetryPolicy:
        return cls(config.attempts, config.backoff_seconds, config.max_backoff_seconds)

    def delays(self) -> list[float]:
        """The waits between attempts: backoff, doubling, capped."""
        return [min(self.max_backoff_seconds, self.backoff_seconds * 2 ** i) for i in range(self.attempts - 1)]


def with_retries(call: Callable[[], T], policy: RetryPolicy, server: str, what: str) -> T:
    """`call()`, tried again after each Transient failure; PacsUnavailable once every attempt failed."""
    started = time.monotonic()
    waits = policy.delays()
    for attempt in range(policy.attempts):
        try:
            return call()
        except Transient as exc:
            last = exc.detail
        if attempt < len(waits):
            log.warning("PACS %s: %s failed (%s); attempt %d of %d in %.1f s", server, what, last,
                        attempt + 2, policy.attempts, waits[attempt])
            time.sleep(waits[attempt])
    raise PacsUnavailable(f"PACS {server} did not answer {what} after {policy.attempts} attempts over "
                          f"{time.monotonic() - started:.0f} s: {last}")


def network_cause(exc: BaseException) -> str:
    """The operating system's words for a network failure ('Connection refused'), found down an
    exception's chain, without the URL (its path holds UIDs) that requests puts in its messages."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        pending += [c for c in (current.__cause__, current.__context__, getattr(current, "reason", None),
                                *current.args) if isinstance(c, BaseException)]
    return "no answer in time" if "timeout" in type(exc).__name__.lower() else "no connection"
