"""Named crash points, for proving that any crash leaves state the next run recovers from (G4).

A crash point is a no-op unless armed, either in-process with :func:`arm` or through the
environment variable ``LEADSYNC_CRASH_AT=<point>[:raise|:kill][@<n>]`` (for a child process or
an ``airflow dags test`` subprocess). When the armed point is reached for the n-th time:

- ``raise`` (default): :class:`InjectedCrash` is raised. It derives from ``BaseException`` so
  that no ``except Exception`` in the code under test can swallow it, like a real crash;
- ``kill``: the process sends itself ``SIGKILL`` — nothing after that line runs, no ``finally``,
  no rollback beyond what the database itself does.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

ENV_VAR = "LEADSYNC_CRASH_AT"

# Every crash point, in the order a run reaches them.
POINTS = (
    "after_open",  # lease taken, run recorded, nothing read
    "after_stage_chunk",  # mid-extraction: some chunks staged, more to read
    "after_stage_batch",  # outbox batches (up to ten) and their ledger rows committed
    "after_stage",  # everything staged, run counters not yet recorded
    "before_send",  # a batch loaded, the request not sent
    "after_send_before_record",  # the platform has the events, the outcome is not recorded
    "between_batches",  # one batch recorded, the next not sent
    "before_watermark_commit",  # all pushes done, watermark not moved
    "before_lease_release",  # watermark moved, lease still held
)


class InjectedCrash(BaseException):
    """A crash injected at a named point (tests only)."""


@dataclass(frozen=True)
class _Plan:
    point: str
    mode: str  # "raise" or "kill"
    nth: int


_lock = threading.Lock()
_armed: _Plan | None = None
_hits: dict[str, int] = {}


def parse(spec: str) -> _Plan:
    """Parses ``point[:raise|:kill][@n]``."""
    nth = 1
    if "@" in spec:
        spec, _, count = spec.partition("@")
        nth = int(count)
    point, _, mode = spec.partition(":")
    mode = mode or "raise"
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}: unknown crash point {point!r} (known: {', '.join(POINTS)})")
    if mode not in ("raise", "kill"):
        raise ValueError(f"{ENV_VAR}: mode must be 'raise' or 'kill', got {mode!r}")
    if nth < 1:
        raise ValueError(f"{ENV_VAR}: @n must be ≥ 1")
    return _Plan(point, mode, nth)


def arm(point: str | None, mode: str = "raise", nth: int = 1) -> None:
    """Arms one crash point in this process (``None`` disarms); resets hit counts."""
    global _armed
    with _lock:
        _armed = parse(f"{point}:{mode}@{nth}") if point else None
        _hits.clear()


def crash_point(name: str) -> None:
    """Crashes here if this point is armed and reached for the n-th time."""
    plan = _armed
    if plan is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            return
        plan = parse(env)
    if plan.point != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit != plan.nth:
        return
    if plan.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedCrash(f"injected crash at {name} (hit {hit})")


def remaining(name: str) -> tuple[str, int] | None:
    """For a child process that reaches ``name`` on this process's behalf: the armed plan's
    mode and how many more hits of ``name`` fire it (None: ``name`` is not armed)."""
    plan = _armed
    if plan is None:
        env = os.environ.get(ENV_VAR)
        plan = parse(env) if env else None
    if plan is None or plan.point != name:
        return None
    left = plan.nth - _hits.get(name, 0)
    return (plan.mode, left) if left >= 1 else None


def reached(name: str, times: int) -> None:
    """Counts ``times`` hits of ``name`` that a child process reached on this process's
    behalf; the one the plan names crashes this process, as :func:`crash_point` would."""
    for _ in range(times):
        crash_point(name)


def hits(name: str) -> int:
    """How many times this process reached ``name`` while it was armed."""
    with _lock:
        return _hits.get(name, 0)
