"""Great Expectations in a process of its own, beside the task that reads the window.

The check task reads, projects, plans and stages rows on one core; this worker imports Great
Expectations (seconds) and validates each projected batch on another, and the task takes each
batch's verdict when it arrives (:class:`leadsync.quality.ContractSession`). The task process
never imports GX or pandas, which keeps it small (``contract.separate_process``).

The worker is ``python -m leadsync.contract_worker``: it reads pickled requests on stdin and
answers each, in order, on its stdout (8-byte length, then the pickle); anything else it
prints goes to stderr, which it shares with the task (its log). It ends when its stdin closes,
so it never outlives the task process, even one that is killed. A process that checks several
windows (tests, the CLI) keeps idle workers for the next one.

What crosses the pipe: the contract spec, the projected batches (CRM lead ids, stage names,
timestamps and values; identifiers only as verdicts, never their values) and counts back.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import resource
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime

    from leadsync.quality import ContractReport, ContractSpec, _Columns, _Result, _Tally

_HEADER = struct.Struct("!Q")
_STOP = object()


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        part = os.read(fd, min(n, 1 << 20))
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_frame(fd: int) -> bytes | None:
    """The body of one frame (8-byte length, then the body) from ``fd``; None at end of
    file."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    return _read_exact(fd, _HEADER.unpack(header)[0])


def _write_frame(fd: int, body: bytes | bytearray) -> None:
    """Writes ``body`` as one frame (its length first; the body is not copied)."""
    for part in (_HEADER.pack(len(body)), body):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def _recv(fd: int) -> Any:
    """One message from ``fd``; None at end of file."""
    body = _read_frame(fd)
    return None if body is None else pickle.loads(body)  # noqa: S301 - our own process


def _readable(fd: int) -> bool:
    """Whether ``fd`` has something to read now (a message, or end of file). ``poll``, not
    ``select``: select fails on a descriptor numbered over 1,023, which a process holding many
    files and connections (a test run, a busy worker) reaches."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _send(fd: int, message: Any) -> None:
    _write_frame(fd, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class _Worker:
    """One worker process and the thread that writes its requests (so that the task goes on
    reading while a large batch is still being handed over)."""

    def __init__(self) -> None:
        env = {**os.environ, "GX_ANALYTICS_ENABLED": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leadsync.contract_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.out = self.proc.stdout.fileno()
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.broken: str | None = None
        self.writer = threading.Thread(target=self._write, name="contract-worker-writer",
                                       daemon=True)
        self.writer.start()

    def _write(self) -> None:
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        while (message := self.outbox.get()) is not _STOP:
            try:
                _send(fd, message)
            except OSError as exc:  # the worker died; the reader reports it
                self.broken = f"could not hand a batch to the contract worker: {exc}"
                return

    def alive(self) -> bool:
        return self.broken is None and self.proc.poll() is None

    def stop(self) -> None:
        self.outbox.put(_STOP)
        end_process(self.proc, self.writer, 5)


def end_process(proc: subprocess.Popen[bytes], writer: threading.Thread, wait_s: float) -> None:
    """Ends a worker whose writer thread was told to stop: its stdin closes (it ends at end
    of file), killed if it has not ended within ``wait_s``."""
    writer.join(timeout=5)
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


_IDLE: list[_Worker] = []
_IDLE_LOCK = threading.Lock()


def _acquire() -> _Worker:
    with _IDLE_LOCK:
        while _IDLE:
            worker = _IDLE.pop()
            if worker.alive():
                return worker
            worker.stop()
    return _Worker()


def _release(worker: _Worker) -> None:
    with _IDLE_LOCK:
        _IDLE.append(worker)


@atexit.register
def _stop_idle() -> None:
    with _IDLE_LOCK:
        workers, _IDLE[:] = list(_IDLE), []
    for worker in workers:
        worker.stop()


class WorkerValidator:
    """The validator of one contract session, in a worker process (see the module doc).

    Same interface as :class:`leadsync.quality._InlineValidator`: batches are submitted in
    order and their results taken in the same order, when :meth:`ready` or by waiting.
    """

    def __init__(self, spec: ContractSpec) -> None:
        self.worker = _acquire()
        self.expected: deque[str] = deque()  # the kind of each reply still to come
        self.peak_rss_mb = 0.0  # the worker's, as of its last answer
        self.seconds: dict[str, float] = {}  # the worker's busy time per kind of request
        self._call("suite", spec)  # the worker imports GX and builds the suite meanwhile

    @property
    def pid(self) -> int:
        return self.worker.proc.pid

    def _call(self, kind: str, *args: Any) -> None:
        self.expected.append(kind)
        self.worker.outbox.put((kind, *args))

    def _reply(self) -> Any:
        from leadsync.quality import ContractError

        kind = self.expected.popleft()
        message = None if self.worker.broken else _recv(self.worker.out)
        if message is None:
            try:
                code: int | None = self.worker.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise ContractError(
                "the contract worker process stopped"
                + (f" (exit code {code})" if code is not None else "")
                + (f" ({self.worker.broken})" if self.worker.broken else "")
                + " before answering; its error, if any, is in the task log above")
        status, payload, peak_kib, seconds = message
        self.peak_rss_mb = max(self.peak_rss_mb, peak_kib / 1024)
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        if status != "ok":
            raise ContractError(f"{payload} (in the contract worker, {kind})")
        return payload

    def _skip_setup(self, block: bool) -> bool:
        """Takes the answer to the suite request, when it comes first; False if it would
        have to wait and ``block`` is false."""
        while self.expected and self.expected[0] == "suite":
            if not block and not _readable(self.worker.out):
                return False
            self._reply()
        return True

    def submit(self, which: str, columns: _Columns) -> None:
        self._call("run", which, columns)

    def ready(self) -> bool:
        if not self._skip_setup(block=False) or not self.expected:
            return False
        return _readable(self.worker.out)

    def take(self) -> list[_Result]:
        self._skip_setup(block=True)
        results: list[_Result] = self._reply()
        return results

    def docs(self, spec: ContractSpec, report: ContractReport, tallies: list[_Tally],
             now: datetime) -> str | None:
        while self.expected:
            self._reply()  # nothing should be left; a caller that skipped results errs here
        self._call("docs", spec, report, tallies, now)
        url: str | None = self._reply()
        return url

    def close(self) -> None:
        """Gives the worker back for the next session (after the answers nobody took, when
        the session stopped early), or ends it when it failed."""
        if self.worker is None:
            return
        healthy = self.worker.alive()
        try:
            while healthy and self.expected:
                self._reply()
        except Exception:  # noqa: BLE001 - a worker that erred is not reused
            healthy = False
        worker, self.worker = self.worker, None  # type: ignore[assignment]
        if healthy and worker.alive():
            _release(worker)
        else:
            worker.proc.kill()
            worker.stop()


def main() -> int:
    """The worker's loop (``python -m leadsync.contract_worker``)."""
    from leadsync.quality import ContractError, _Suite
    from leadsync.redact import clean_error

    out = os.dup(1)
    os.dup2(2, 1)  # stray prints (GX, pandas) go to stderr, never into the answers
    suite: _Suite | None = None
    while (message := _recv(0)) is not None:
        kind, *args = message
        started = time.perf_counter()
        try:
            if kind == "suite":
                suite = _Suite(args[0])
                answer: Any = None
            elif suite is None:
                raise ContractError("the contract suite could not be built")
            elif kind == "run":
                answer = suite.run(*args)
            else:
                answer = suite.docs(*args)
            reply = ("ok", answer)
        except ContractError as exc:
            reply = ("error", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the task, which fails clearly
            reply = ("error", f"Great Expectations failed: {clean_error(exc)}")
        _send(out, (*reply, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
