"""The Conversions pages rendered by a real headless chromium from a real ``airflow
api-server``: the destinations and their numbers are on the page; one screenshot per page is
kept under ``.leadsync/screenshots/`` (a test artifact)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .cdp import Chromium
from .conftest import ARTIFACTS, ApiServer, Seeded
from .test_status_api import _state_show

TOTALS = ("delivered", "pending", "failed", "expired", "skipped", "quarantined")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path / "profile")  # a fresh --user-data-dir per test
    try:
        yield chromium
    finally:
        chromium.close()


def _text(browser: Chromium) -> str:
    return str(browser.evaluate("document.body.innerText"))


def test_without_a_session_the_page_shows_no_data(api_server: ApiServer,
                                                  browser: Chromium) -> None:
    browser.open(f"{api_server.url}/leadsync/")
    text = _text(browser)
    assert "Not authenticated" in text
    assert "delivered" not in text and "tiktok" not in text


def test_pages_render_destinations_and_their_numbers(api_server: ApiServer, seeded: Seeded,
                                                     browser: Chromium) -> None:
    shown = _state_show(seeded)
    browser.set_cookie(api_server.url, "_token", api_server.token("viewer"))

    browser.open(f"{api_server.url}/leadsync/")
    cells = json.loads(browser.evaluate("""JSON.stringify(Object.fromEntries(
        [...document.querySelectorAll('section.destination')].map(s => [s.id,
          Object.fromEntries([...s.querySelectorAll('table.totals td')].map(
            td => [td.dataset.key, Number(td.innerText)])),
        ])))"""))
    assert cells == {f"dest-{name}": {k: shown[name][k] for k in TOTALS} for name in shown}
    assert int(browser.evaluate("document.querySelectorAll('svg.chart rect').length")) > 0
    text = _text(browser)
    for name in shown:
        mark = datetime.fromisoformat(shown[name]["watermark"]["updated_at"]).astimezone(UTC)
        assert f"Watermark: {mark:%Y-%m-%d %H:%M:%S} UTC" in text
    browser.screenshot(ARTIFACTS / "overview.png")

    browser.open(f"{api_server.url}/leadsync/quarantine")
    text = _text(browser)
    for rule in ("bad_currency", "future_event_time", "no_match_keys"):
        assert rule in text
    browser.screenshot(ARTIFACTS / "quarantine.png")

    browser.open(f"{api_server.url}/leadsync/dead-letters?destination=tiktok")
    assert "INVALID_EMAIL" in _text(browser)
    browser.screenshot(ARTIFACTS / "dead-letters.png")

    meta_run = seeded.runs["meta"][-1]["run_id"]
    browser.open(f"{api_server.url}/leadsync/pending?destination=meta")
    text = _text(browser)
    assert meta_run in text and "nothing here" not in text
    browser.screenshot(ARTIFACTS / "pending.png")

    # Filtered by run: the run's own rows and a link to the run in the Airflow UI.
    first_meta = seeded.runs["meta"][0]["run_id"]
    browser.open(f"{api_server.url}/leadsync/pending?destination=meta&run={first_meta}")
    assert "nothing here" in _text(browser)
    link = browser.evaluate("document.querySelector('a[target=_top]').getAttribute('href')")
    assert link == f"/dags/leadsync_meta/runs/{first_meta}"

    # The run's Data Docs, served through the plugin.
    browser.open(f"{api_server.url}/leadsync/")
    docs = browser.evaluate(
        "[...document.querySelectorAll('a')].filter(a => a.innerText.trim() == 'Data Docs')"
        ".map(a => a.href)")
    assert docs, "no Data Docs link on the overview"
    browser.open(docs[0])
    assert "leadsync_" in _text(browser)
    browser.screenshot(ARTIFACTS / "data-docs.png")


def test_the_page_sits_inside_the_airflow_ui(api_server: ApiServer, browser: Chromium) -> None:
    # The external view's route in Airflow's React UI: the page in an iframe under the nav.
    browser.set_cookie(api_server.url, "_token", api_server.token("admin"))
    browser.open(f"{api_server.url}/plugin/leadsync", settle=1)
    frame_text = ""
    deadline = time.monotonic() + 60
    while "Watermark" not in frame_text and time.monotonic() < deadline:
        time.sleep(0.5)
        frame_text = str(browser.evaluate(
            "(document.querySelector('iframe')?.contentDocument?.body?.innerText) || ''"))
    assert "Watermark" in frame_text and "tiktok" in frame_text
    assert "Browse" in _text(browser)  # Airflow's own navigation around it
    browser.screenshot(ARTIFACTS / "airflow-ui.png", full_page=False)
    # The external view is listed in the Browse menu.
    browser.evaluate("[...document.querySelectorAll('button')]"
                     ".find(b => b.innerText.trim() == 'Browse').click()")
    deadline = time.monotonic() + 20
    while "Conversions" not in _text(browser) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "Conversions" in _text(browser)
