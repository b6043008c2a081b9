"""Alerts at the end of each run: one message when a condition starts, one when it recovers.

Conditions, per destination (thresholds in the config's ``alerts:`` section):

- ``failed_run``: the run ended red (the contract breaker tripped, or batches were left
  pending: platform outage, bad credentials);
- ``quarantine_share``: the share of the run's checked rows that went to quarantine;
- ``dead_letters``: events the platform rejected in the run;
- ``watermark_lag``: how far the watermark trails now once the run is committed;
- ``platform_errors``: where the platform reports processing feedback later (Data Manager
  request status), the share of the records it processed in the last 24 h that it reports as
  errors.

The last state of each condition is kept in the state store (``ls_alerts``): an alert goes
out when a condition starts (``firing``) and a recovery message when it ends, never once per
run while it lasts. A state is only recorded once at least one notifier took the message, so
a notifier outage delays the alert rather than losing it.

Messages carry counts, rule codes, the platform's error codes and links, never identifiers.
Notifiers are Airflow notifiers: the providers' Slack, SMTP and Apprise ones where installed,
and :class:`WebhookNotifier`, a plain JSON POST of our own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import requests
from airflow.sdk import BaseNotifier
from sqlalchemy import func, select

from leadsync.config import AlertsConfig, Config, NotifierConfig
from leadsync.state import FAILED, FAILED_REASONS, StateStore, ledger

log = logging.getLogger(__name__)

FIRING = "firing"
OK = "ok"
FAILED_RUN_STATUSES = ("partial", "contract_failed", "check_failed")


@dataclass(frozen=True)
class Condition:
    """One measured condition of a run: breached or not, and what was measured."""

    kind: str
    breached: bool
    text: str


@dataclass(frozen=True)
class Alert:
    """A change of state to announce (``firing`` or ``ok``, the recovery)."""

    destination: str
    kind: str
    status: str
    run_id: str
    text: str
    links: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        word = "ALERT" if self.status == FIRING else "RECOVERED"
        return f"[leadsync] {word} {self.destination}: {self.kind.replace('_', ' ')}"

    @property
    def message(self) -> str:
        links = "\n".join(f"{name}: {url}" for name, url in self.links.items())
        return f"{self.title}\n{self.text}\n{links}".strip()

    def payload(self) -> dict[str, Any]:
        """The JSON the webhook notifier posts."""
        return {"destination": self.destination, "kind": self.kind, "status": self.status,
                "run_id": self.run_id, "text": self.text, "links": self.links}


# -- conditions ---------------------------------------------------------------------------


def _codes(counts: Mapping[str, Any], prefix: str) -> str:
    found = sorted((k.removeprefix(prefix), int(v)) for k, v in counts.items()
                   if k.startswith(prefix) and int(v))
    return ", ".join(f"{code}={n}" for code, n in found) or "none"


def conditions(cfg: AlertsConfig, run: Mapping[str, Any], pending_batches: int,
               dead_letter_reasons: Mapping[str, int], watermark_ts: datetime | None,
               now: datetime,
               platform_records: Mapping[str, int] | None = None) -> list[Condition]:
    """The conditions ``cfg`` watches, measured on one committed run (pure).

    A condition that cannot be measured on this run (no rows checked, no watermark yet) is
    left out, so its state stays as it was.
    """
    counts: Mapping[str, Any] = run.get("counts") or {}
    status = str(run.get("status"))
    found: list[Condition] = []
    if cfg.failed_run:
        if status in ("contract_failed", "check_failed"):
            text = (f"the run ended {status}: the data contract check did not pass, nothing "
                    f"was sent; quarantined by rule: {_codes(counts, 'quarantined.')}")
        elif status == "partial":
            text = (f"the run ended partial: {pending_batches} outbox batch(es) still pending "
                    "(platform errors or credentials; see the push task logs); the next run "
                    "resends them with the same event ids")
        else:
            text = f"the run ended {status}"
        found.append(Condition("failed_run", status in FAILED_RUN_STATUSES, text))
    checked = int(counts.get("checked") or counts.get("read") or 0)
    if cfg.max_quarantine_share is not None and checked:
        quarantined = int(counts.get("quarantined", 0))
        share = quarantined / checked
        found.append(Condition(
            "quarantine_share", share > cfg.max_quarantine_share,
            f"{quarantined} of {checked} rows quarantined ({share:.1%}, threshold "
            f"{cfg.max_quarantine_share:.1%}); by rule: {_codes(counts, 'quarantined.')}"))
    if cfg.max_dead_letters is not None and status not in ("contract_failed", "check_failed"):
        failed = int(counts.get("failed", 0))
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(dead_letter_reasons.items()))
        found.append(Condition(
            "dead_letters", failed > cfg.max_dead_letters,
            f"{failed} event(s) rejected by the platform in this run (threshold "
            f"{cfg.max_dead_letters}); platform error codes: {reasons or 'none'}"))
    if cfg.max_watermark_lag is not None and watermark_ts is not None:
        lag = now - watermark_ts
        found.append(Condition(
            "watermark_lag", lag > cfg.max_watermark_lag,
            f"the watermark is {_duration(lag)} behind now (maximum "
            f"{_duration(cfg.max_watermark_lag)})"))
    records = platform_records or {}
    processed = sum(int(v) for k, v in records.items()
                    if k == "ingested" or k.startswith("error."))
    if cfg.max_platform_error_share is not None and processed:
        errors = sum(int(v) for k, v in records.items() if k.startswith("error."))
        share = errors / processed
        found.append(Condition(
            "platform_errors", share > cfg.max_platform_error_share,
            f"the platform reports {errors} of {processed} records processed in the last 24 h "
            f"as errors ({share:.1%}, threshold {cfg.max_platform_error_share:.1%}); reasons: "
            f"{_codes(records, 'error.')}"))
    return found


def _duration(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


def transitions(previous: Mapping[str, str],
                measured: Sequence[Condition]) -> list[tuple[Condition, str]]:
    """The conditions whose state changes, with their new state (pure)."""
    changes = []
    for cond in measured:
        before = previous.get(cond.kind, OK)
        if cond.breached and before != FIRING:
            changes.append((cond, FIRING))
        elif not cond.breached and before == FIRING:
            changes.append((cond, OK))
    return changes


# -- notifiers ----------------------------------------------------------------------------


class WebhookNotifier(BaseNotifier):
    """POSTs the alert as JSON (``{"text", "title", ...}``) to a URL, or to the URL held by a
    connection's host (for URLs that embed a token)."""

    template_fields = ("text",)

    def __init__(self, *, text: str, title: str = "", payload: Mapping[str, Any] | None = None,
                 url: str | None = None, connection_id: str | None = None,
                 timeout: float = 10.0) -> None:
        super().__init__()
        self.text = text
        self.title = title
        self.payload = dict(payload or {})
        self.url = url
        self.connection_id = connection_id
        self.timeout = timeout

    def _target(self) -> str:
        if self.url:
            return self.url
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(str(self.connection_id))
        host = str(conn.host or "")
        if "://" in host:
            return host
        port = f":{conn.port}" if conn.port else ""
        return f"{conn.schema or 'https'}://{host}{port}"

    def notify(self, context: Any) -> None:
        resp = requests.post(self._target(), timeout=self.timeout,
                             json={**self.payload, "title": self.title, "text": self.text})
        resp.raise_for_status()


def build_notifier(cfg: NotifierConfig, alert: Alert) -> BaseNotifier:
    """The Airflow notifier that sends ``alert`` where ``cfg`` says."""
    if cfg.type == "webhook":
        return WebhookNotifier(text=alert.message, title=alert.title, payload=alert.payload(),
                               url=cfg.url, connection_id=cfg.connection_id)
    if cfg.type == "slack":
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        kwargs = {"slack_webhook_conn_id": cfg.connection_id} if cfg.connection_id else {}
        return SlackWebhookNotifier(text=alert.message, **kwargs)
    if cfg.type == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        html = "<br>".join(line for line in alert.message.splitlines())
        return SmtpNotifier(to=cfg.to, from_email=cfg.from_email, subject=alert.title,
                            html_content=html, smtp_conn_id=cfg.connection_id)
    from airflow.providers.apprise.notifications.apprise import AppriseNotifier

    kwargs = {"apprise_conn_id": cfg.connection_id} if cfg.connection_id else {}
    return AppriseNotifier(body=alert.message, title=alert.title, **kwargs)


def send(alert: Alert, notifiers: Sequence[NotifierConfig]) -> int:
    """Sends ``alert`` through every notifier; returns how many took it. A failing notifier
    is logged by type and exception class only (its message may hold a webhook URL)."""
    delivered = 0
    for cfg in notifiers:
        try:
            context: Any = {"leadsync_alert": alert.payload()}
            build_notifier(cfg, alert).notify(context)
            delivered += 1
        except Exception as exc:  # noqa: BLE001 - one notifier's failure must not stop others
            log.warning("alert %s/%s: the %s notifier failed (%s)", alert.destination,
                        alert.kind, cfg.type, type(exc).__name__)
    return delivered


# -- one run ------------------------------------------------------------------------------


def _dead_letter_reasons(store: StateStore, destination: str, run_id: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(ledger.c.reason, func.count()).where(
                ledger.c.destination == destination, ledger.c.run_id == run_id,
                ledger.c.status == FAILED,
                ledger.c.reason.in_(FAILED_REASONS),  # the index of dead letters (Postgres)
            ).group_by(ledger.c.reason))
        return {str(reason or "unknown"): int(n) for reason, n in rows}


def _platform_records(store: StateStore, destination: str, now: datetime) -> dict[str, int]:
    """Record counts by outcome (``ingested``, ``error.<REASON>``, …) that the platform
    reported for this destination's requests checked in the last 24 h."""
    tally: dict[str, int] = {}
    since = now - timedelta(hours=24)
    for request in store.request_rows(destination):
        checked = request.get("checked_at")
        if not request.get("done") or checked is None or checked < since:
            continue
        for per_destination in (request.get("counts") or {}).values():
            for key, n in dict(per_destination).items():
                tally[key] = tally.get(key, 0) + int(n)
    return tally


def _links(cfg: AlertsConfig, dag_id: str, destination: str, run_id: str,
           kind: str) -> dict[str, str]:
    base = cfg.ui_base_url
    run = quote(run_id, safe="")
    links = {"run": f"{base}/dags/{dag_id}/runs/{run}",
             "conversions": f"{base}/leadsync/?destination={destination}"}
    if kind == "quarantine_share":
        links["quarantine"] = f"{base}/leadsync/quarantine?destination={destination}&run={run}"
    if kind == "dead_letters":
        links["dead_letters"] = (f"{base}/leadsync/dead-letters?destination={destination}"
                                 f"&run={run}")
    if kind == "failed_run":
        links["pending"] = f"{base}/leadsync/pending?destination={destination}"
    return links


def check_run(config: Config, store: StateStore, destination: str, run_id: str,
              now: datetime | None = None) -> list[Alert]:
    """Measures the committed run, sends the alerts whose state changed, records the new
    states; returns the alerts that went out. Does nothing without notifiers."""
    cfg = config.alerts
    if not cfg.notifiers:
        return []
    run = store.get_run(run_id, destination)
    if run is None:
        return []
    now = now or datetime.now(UTC)
    watermark = store.get_watermark(destination)
    measured = conditions(cfg, run, len(store.pending_batch_ids(destination)),
                          _dead_letter_reasons(store, destination, run_id),
                          watermark.ts if watermark else None, now,
                          _platform_records(store, destination, now)
                          if cfg.max_platform_error_share is not None else None)
    dag_id = config.destination(destination).dag_id
    sent = []
    for cond, status in transitions(store.alert_state(destination), measured):
        alert = Alert(destination, cond.kind, status, run_id, cond.text,
                      _links(cfg, dag_id, destination, run_id, cond.kind))
        if send(alert, cfg.notifiers):
            store.set_alert_state(destination, cond.kind, status, run_id, alert.message)
            sent.append(alert)
    return sent


def alert_on_run(config: Config, store: StateStore, destination: str, run_id: str) -> None:
    """:func:`check_run` for the DAG's commit task: alerting never changes a run's outcome."""
    try:
        for alert in check_run(config, store, destination, run_id):
            log.info("alert sent: %s", alert.title)
    except Exception as exc:  # noqa: BLE001 - a broken alert path must not fail the commit
        log.warning("alerts for %s could not be evaluated (%s)", destination,
                    type(exc).__name__)
