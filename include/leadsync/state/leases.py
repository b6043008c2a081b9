"""Leases: two runs of one destination never interleave."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from leadsync.state.model import LeaseBusyError, StorePart, utcnow
from leadsync.state.schema import leases

log = logging.getLogger(__name__)


def take_lease(conn: Connection, destination: str, holder: str, ttl: timedelta) -> bool:
    """Takes the destination's lease in ``conn``'s transaction if it is free, expired, or
    already ``holder``'s (then its expiry moves to now + ``ttl``)."""
    now = utcnow()
    res = conn.execute(
        update(leases)
        .where(
            leases.c.destination == destination,
            or_(leases.c.holder == holder, leases.c.expires_at < now),
        )
        .values(holder=holder, acquired_at=now, expires_at=now + ttl)
    )
    if res.rowcount:
        return True
    try:
        with conn.begin_nested():
            conn.execute(
                insert(leases).values(
                    destination=destination,
                    holder=holder,
                    acquired_at=now,
                    expires_at=now + ttl,
                )
            )
        return True
    except IntegrityError:
        return False


class LeasePart(StorePart):
    """The destination's lease, with a heartbeat for long steps."""

    def acquire_lease(self, destination: str, holder: str, ttl: timedelta) -> bool:
        """Takes the destination's lease if it is free, expired, or already ours."""
        with self.engine.begin() as conn:
            return take_lease(conn, destination, holder, ttl)

    def wait_for_lease(
        self, destination: str, holder: str, ttl: timedelta, wait: timedelta
    ) -> None:
        """Acquires the lease, polling up to ``wait``; raises :class:`LeaseBusyError`."""
        deadline = time.monotonic() + wait.total_seconds()
        while True:
            if self.acquire_lease(destination, holder, ttl):
                return
            if time.monotonic() >= deadline:
                current = self.lease_holder(destination)
                raise LeaseBusyError(
                    f"destination {destination!r} is being synced by another run "
                    f"({current or 'unknown'}); not starting a second one"
                )
            time.sleep(min(1.0, max(0.05, wait.total_seconds() / 20)))

    def renew_lease(self, destination: str, holder: str, ttl: timedelta) -> bool:
        """Extends our lease; False when someone else holds it."""
        now = utcnow()
        with self.engine.begin() as conn:
            res = conn.execute(
                update(leases)
                .where(leases.c.destination == destination, leases.c.holder == holder)
                .values(expires_at=now + ttl)
            )
            return bool(res.rowcount)

    def release_lease(self, destination: str, holder: str) -> None:
        """Gives the lease back (only if we hold it)."""
        with self.engine.begin() as conn:
            conn.execute(
                delete(leases).where(leases.c.destination == destination, leases.c.holder == holder)
            )

    def lease_holder(self, destination: str) -> str | None:
        """Who holds the lease now (None if free or expired)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(leases.c.holder, leases.c.expires_at).where(
                    leases.c.destination == destination
                )
            ).first()
        if row is None or row.expires_at < utcnow():
            return None
        return str(row.holder)

    @contextmanager
    def heartbeat(self, destination: str, holder: str, ttl: timedelta,
                  also: Callable[[], object] | None = None) -> Iterator[None]:
        """Keeps renewing the lease in a thread while a long step runs; ``also`` is called
        after each renewal (a push lane renews its batch claims with it)."""
        stop = threading.Event()
        interval = max(0.5, ttl.total_seconds() / 3)

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    if not self.renew_lease(destination, holder, ttl):
                        log.warning("lease on %s lost by %s", destination, holder)
                        return
                    if also is not None:
                        also()
                except Exception:
                    log.warning("lease heartbeat for %s failed", destination, exc_info=True)

        thread = threading.Thread(target=beat, name=f"lease-{destination}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
