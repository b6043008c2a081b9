"""What ``check_contract`` stages, written from a process of its own (``state.writer_process``).

The check task reads, plans and hands the contract its rows on one core; this worker decides
each planned row once its verdict is in and writes what the pass stages (held outbox batches
with their pending ledger rows, terminal ledger rows, quarantine entries) on another. Writing
is mostly the database's own work; in a thread of the task it would still wait for Python's
global interpreter lock, which the reading and planning hold, once per row (SQLite's
``executemany`` gives the lock back between rows): measured 1.7 s alone, 9.6 s beside a busy
thread for 50,000 ledger rows.

The worker is ``python -m leadsync.stage_worker``. It gets the calls of
:class:`leadsync.pipeline._Stager` on stdin, in the order the task makes them, runs them on
its own connection to the state store, and answers once, at the end (8-byte length, then the
pickle, on its stdout): what the pass counted, or its error. The bulk, the planned rows
(``add``), crosses column by column (:mod:`leadsync.stage_wire`). A thread of the worker reads
stdin as it comes (:class:`_Inbox`), from before the worker's imports on, so that the task's
writes never wait for the worker to start, nor to finish deciding and writing a group (a
second for 25,000 rows). It is the only writer of
the pass; the task reads the ledger meanwhile (settled rows of the lookback), which WAL
(SQLite) and MVCC (Postgres) allow. It ends when its stdin closes, and writes nothing more once
its task process is gone, so a killed task leaves nothing running and nothing sendable: what
it staged is held, and the next attempt discards it.

What crosses the pipe: the state store's URL, the planned rows (event ids, CRM lead ids and
stages, cursors, hashed and encoded event bodies, identifier names; never a raw identifier)
and counts back.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from leadsync import faults
from leadsync.contract_worker import (
    _read_frame,
    _readable,
    _recv,
    _send,
    _write_frame,
    end_process,
)

if TYPE_CHECKING:
    from leadsync.pipeline import StageResult
    from leadsync.state import StateStore

_POINT = "after_stage_batch"  # the crash point the stager reaches
_STOP = object()
# Calls waiting to be encoded and handed over: the bound on what the task runs ahead of the
# worker (up to 2,000 planned rows each, ~2.5 MB).
_QUEUED_CALLS = 4
# Frames the worker has read and not run yet, in bytes: what the task can run ahead while the
# worker writes (~45,000 rows), with memory flat however large the window.
_INBOX_BYTES = 64 << 20
# The pipe to the worker (Linux's default is 64 KiB): its reader thread wakes, and takes the
# interpreter lock, once per megabyte rather than per 64 KiB.
_PIPE_BYTES = 1 << 20
class _Inbox:
    """The frames on ``fd``, read by a thread of their own as they come, up to ``limit``
    bytes ahead of :meth:`get`.

    The thread only reads bytes (decoding is the main loop's): it releases the interpreter
    lock while it waits in ``read`` and takes it back once per read of up to a pipe's worth,
    so it neither waits long for the lock the worker's writes hold nor holds it from them.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self.limit = limit
        self.frames: deque[bytes | None] = deque()  # None: end of file
        self.size = 0
        self.ready = threading.Condition()
        threading.Thread(target=self._read, args=(fd,), name="stage-worker-reader",
                         daemon=True).start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                frame = _read_frame(fd)
            except OSError:
                frame = None
            size = 0 if frame is None else len(frame)
            with self.ready:
                while self.size and self.size + size > self.limit:
                    self.ready.wait()
                self.frames.append(frame)
                self.size += size
                self.ready.notify()
            if frame is None:
                return

    def get(self) -> bytes | None:
        """The next frame, once it is read; None at end of file."""
        with self.ready:
            while not self.frames:
                self.ready.wait()
            frame = self.frames.popleft()
            self.size -= 0 if frame is None else len(frame)
            self.ready.notify()
            return frame


class StageWorkerError(RuntimeError):
    """The stage worker failed (its error, redacted, is the message)."""


class RemoteStager:
    """A :class:`leadsync.pipeline._Stager` in a worker process: same calls; answers at
    :meth:`close`, or with the first error (raised at the next call)."""

    def __init__(self, state: StateStore, name: str, run_id: str, size: int,
                 destination_type: str) -> None:
        # The worker never arms a crash point from the environment: this process tells it
        # where to stop, and crashes itself there (faults.reached).
        env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leadsync.stage_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError, AttributeError):  # Linux only; a larger pipe
            fcntl.fcntl(self.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        self.out = self.proc.stdout.fileno()
        self.calls: queue.Queue[Any] = queue.Queue(maxsize=_QUEUED_CALLS)
        self.broken: str | None = None
        self.peak_rss_mb = 0.0
        self.writer = threading.Thread(target=self._write, name="stage-worker-writer",
                                       daemon=True)
        self.writer.start()
        url = state.engine.url.render_as_string(hide_password=False)
        self._put(("init", url, name, run_id, size, destination_type,
                   faults.remaining(_POINT)))

    def _write(self) -> None:
        from leadsync.stage_wire import frame

        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        while (message := self.calls.get()) is not _STOP:
            try:
                _write_frame(fd, frame(message))
            except OSError as exc:  # the worker died; its answer (or its absence) says why
                self.broken = str(exc)
                return

    def _put(self, message: Any) -> None:
        if _readable(self.out):
            self._answer()  # the worker answered early: an error or a crash, raised here
        while True:
            try:
                self.calls.put(message, timeout=0.5)
                return
            except queue.Full:
                if self.broken is not None or self.proc.poll() is not None:
                    self._answer()

    def _answer(self) -> StageResult:
        message = _recv(self.out)
        if message is None:
            try:
                code: int | None = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise StageWorkerError(
                "the stage worker process stopped"
                + (f" (exit code {code})" if code is not None else "")
                + " before answering; its error, if any, is in the task log above")
        status, payload, hits, peak_kib = message
        self.peak_rss_mb = max(self.peak_rss_mb, peak_kib / 1024)
        faults.reached(_POINT, hits)  # a crash the worker stopped at happens here
        if status != "ok":
            raise StageWorkerError(f"staging failed (in the stage worker): {payload}")
        result: StageResult = payload
        return result

    def add(self, items: list[Any]) -> None:
        self._put(("add", items))

    def quarantine(self, records: list[Any]) -> None:
        self._put(("quarantine", records))

    def verdicts(self, records: list[Any], failed: list[int], upto: int) -> None:
        self._put(("verdicts", records, failed, upto))

    def decide(self, upto: int) -> None:
        self._put(("decide", upto))

    def close(self, decide: bool = True) -> StageResult:
        """The last rows decided and written (unless not ``decide``); what the pass counted,
        its seconds named ``writer.*`` (spent in parallel with the task)."""
        self._put(("close", decide))
        result = self._answer()
        self._end()
        from leadsync.pipeline import StageResult

        seconds = {f"writer.{k}": v for k, v in result.seconds.items()}
        seconds["writer.peak_rss_mb"] = self.peak_rss_mb
        return StageResult(result.counts, result.coverage_events, result.coverage_keys,
                           result.passed, seconds)

    def _end(self) -> None:
        with contextlib.suppress(queue.Full):
            self.calls.put(_STOP, timeout=5)
        end_process(self.proc, self.writer, 10)

    def kill(self) -> None:
        """Stops the worker now, whatever it was doing (the check is unwinding)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        while True:  # unblocks the writer thread
            try:
                self.calls.get_nowait()
            except queue.Empty:
                break
        self.calls.put(_STOP)
        self.writer.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def _die_with_parent() -> None:
    """Asks Linux to kill this process when the task process dies (best effort)."""
    with contextlib.suppress(Exception):  # elsewhere the parent check in main() suffices
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> int:
    """The worker's loop (``python -m leadsync.stage_worker``)."""
    inbox = _Inbox(0, _INBOX_BYTES)  # reads while the imports below take their second
    from leadsync.db import make_engine
    from leadsync.pipeline import _Stager
    from leadsync.redact import clean_error
    from leadsync.stage_wire import message
    from leadsync.state import StateStore

    out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the answer
    parent = os.getppid()
    _die_with_parent()
    stager: _Stager | None = None
    engine = None

    def answer(status: str, payload: Any) -> None:
        hits = faults.hits(_POINT)
        _send(out, (status, payload, hits, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))

    try:
        while (frame := inbox.get()) is not None:
            if os.getppid() != parent:
                return 1  # the task is gone: nothing more is written
            try:
                with contextlib.nullcontext() if stager is None else stager.timer("wire"):
                    method, *args = message(frame)  # decoded here, not in the reader
                if method == "init":
                    url, name, run_id, size, destination_type, crash = args
                    if crash is not None:
                        faults.arm(_POINT, "raise", crash[1])
                    engine = make_engine(url)
                    started = time.perf_counter()
                    stager = _Stager(StateStore(engine), name, run_id, size, destination_type)
                    stager.seconds["state"] = time.perf_counter() - started
                    # What the worker imported and set up lives as long as it: parked, so
                    # that the full collections its stream of decoded rows sets off do not
                    # walk it each time (measured: decoding 200,000 rows 3.3 µs a row
                    # with it parked, 4.7 µs without).
                    gc.collect()
                    gc.freeze()
                elif stager is None:
                    raise StageWorkerError("the stager was not set up")
                elif method == "close":
                    answer("ok", stager.close(*args))
                    return 0
                else:
                    getattr(stager, method)(*args)
            except faults.InjectedCrash:
                answer("crash", None)  # the task crashes at this point in its stead
                return 0
            except Exception as exc:  # noqa: BLE001 - reported to the task, which fails clearly
                answer("error", clean_error(exc))
                return 1
        return 0
    finally:
        if engine is not None:
            engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
