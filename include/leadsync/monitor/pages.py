"""HTML of the Conversions pages: Jinja2 templates (autoescaped) and a server-rendered SVG
chart, no script and no CDN, so the pages work inside the Airflow UI's iframe as they are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from jinja2 import DictLoader, Environment, select_autoescape
from markupsafe import Markup

# Series of the events-per-run chart, bottom to top, with their colours.
CHART_SERIES = (("delivered", "#2e7d32"), ("failed", "#c62828"), ("expired", "#9e9e9e"),
                ("skipped", "#f9a825"), ("quarantined", "#6a1b9a"))


def runs_chart(runs: Sequence[Mapping[str, Any]], width: int = 640, height: int = 180) -> Markup:
    """A stacked bar chart of events per run (oldest left) as inline SVG.

    Args:
        runs: newest first, as :func:`leadsync.monitor.status.last_runs` returns them.
    """
    ordered = list(reversed(runs))
    pad_left, pad_bottom, pad_top = 44, 18, 8
    plot_w, plot_h = width - pad_left - 8, height - pad_bottom - pad_top
    totals = [sum(int(r["counts"].get(k, 0)) for k, _ in CHART_SERIES) for r in ordered]
    top = max(totals, default=0) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
             f'height="{height}" role="img" aria-label="events per run">']
    for frac in (0.0, 0.5, 1.0):
        y = pad_top + plot_h * (1 - frac)
        parts.append(f'<line x1="{pad_left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{pad_left - 4}" y="{y + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{round(top * frac)}</text>')
    slot = plot_w / max(len(ordered), 1)
    bar_w = max(slot * 0.7, 1.0)
    for i, run in enumerate(ordered):
        x = pad_left + i * slot + (slot - bar_w) / 2
        y = pad_top + plot_h
        for key, colour in CHART_SERIES:
            n = int(run["counts"].get(key, 0))
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            title = Markup.escape(f"{run['run_id']}: {n} {key}")
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{title}</title></rect>')
    parts.append(f'<text x="{pad_left}" y="{height - 4}" font-size="10">'
                 f'{len(ordered)} run(s), oldest left</text>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - numbers and escaped run ids only


_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leadsync — {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
nav a{margin-right:12px} table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f5f5f5} td.links{white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
section{border:1px solid #e0e0e0;border-radius:6px;padding:8px 14px;margin:12px 0;
overflow-x:auto}
.status-success{color:#2e7d32}
.status-partial,.status-contract_failed,.status-check_failed{color:#c62828}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
.muted{color:#777;font-size:12px}
</style></head><body>
<nav><strong>leadsync</strong> ·
<a href="{{ root }}/">Overview</a>
<a href="{{ root }}/quarantine{{ q }}">Quarantine</a>
<a href="{{ root }}/dead-letters{{ q }}">Dead letters</a>
<a href="{{ root }}/pending{{ q }}">Pending batches</a>
<a href="{{ root }}/api/status">JSON</a></nav>
<h1>{{ title }}</h1>
{% if run_id %}<p>Filtered by run <code>{{ run_id }}</code> —
<a href="{{ airflow_run_url }}" target="_top">open the run in Airflow</a> ·
<a href="?destination={{ destination }}">all runs</a></p>{% endif %}
{% block body %}{% endblock %}
</body></html>"""

_OVERVIEW = """{% extends "base" %}{% block body %}
{% for d in destinations %}
<section id="dest-{{ d.name }}" class="destination">
<h2>{{ d.name }} <span class="muted">({{ d.type }}, DAG <a target="_top"
 href="{{ d.dag_url }}">{{ d.dag_id }}</a>)</span></h2>
<p>Watermark: <strong>{{ d.watermark|when if d.watermark else "none yet" }}</strong>
{% if d.lag is not none %} — lag <strong class="lag">{{ d.lag }}</strong>{% endif %}</p>
<table class="totals"><tr>{% for k in totals_keys %}<th>{{ k }}</th>{% endfor %}</tr>
<tr>{% for k in totals_keys %}<td class="n" data-key="{{ k }}">{{ d.totals[k] }}</td>
{% endfor %}</tr></table>
{% if d.last_run %}<p>Last run <a target="_top" href="{{ d.last_run.airflow_url }}">
{{ d.last_run.run_id }}</a>: <span class="status-{{ d.last_run.status }}">
{{ d.last_run.status }}</span>, {{ d.last_run.started_at|when }}</p>{% endif %}
<h3>Events per run (last {{ d.runs|length }})</h3>
<div class="legend">{% for k, c in series %}<span><i style="background:{{ c }}"></i>{{ k }}</span>
{% endfor %}</div>
{{ d.chart }}
{% if d.coverage %}<h3>Match-key coverage (share of sent events carrying each key)</h3>
<table class="coverage"><tr><th>run</th><th>events</th>{% for k in d.coverage_keys %}
<th>{{ k }}</th>{% endfor %}</tr>
{% for c in d.coverage %}<tr><td>{{ c.run_id }}</td><td class="n">{{ c.events }}</td>
{% for k in d.coverage_keys %}<td class="n">{{ "%.0f%%"|format(100 * c.shares.get(k, 0)) }}
</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if d.requests %}<h3>Platform processing status (Data Manager requests)</h3>
<table><tr><th>sent</th><th>run</th><th>events</th><th>status</th><th>counts</th>
<th>message</th></tr>{% for r in d.requests %}<tr><td>{{ r.sent_at }}</td>
<td>{{ r.run_id }}</td><td class="n">{{ r.events }}</td><td>{{ r.status }}</td>
<td>{{ r.counts }}</td><td>{{ r.message or "" }}</td></tr>{% endfor %}</table>{% endif %}
<h3>Runs</h3>
<table class="runs"><tr><th>run</th><th>status</th><th>started</th>
{% for k in run_keys %}<th>{{ k }}</th>{% endfor %}<th></th></tr>
{% for r in d.runs %}<tr><td><a target="_top" href="{{ r.airflow_url }}">{{ r.run_id }}</a></td>
<td class="status-{{ r.status }}">{{ r.status }}</td><td>{{ r.started_at|when }}</td>
{% for k in run_keys %}<td class="n">{{ r.counts[k] }}</td>{% endfor %}
<td class="links"><a href="{{ root }}/quarantine?destination={{ d.name }}&run={{
 r.run_id|urlencode }}">
quarantine</a> · <a href="{{ root }}/dead-letters?destination={{ d.name }}&run={{
 r.run_id|urlencode }}">dead letters</a>{% if r.data_docs %} · <a href="{{ r.data_docs }}">
Data Docs</a>{% endif %}</td></tr>{% endfor %}</table>
</section>
{% else %}<p>No destination is configured.</p>{% endfor %}
{% endblock %}"""

_TABLE = """{% extends "base" %}{% block body %}
{% for d in destinations %}
<section class="destination" id="dest-{{ d.name }}"><h2>{{ d.name }}</h2>
{% if d.summary %}<table class="summary"><tr>{% for k in d.summary[0] %}<th>{{ k }}</th>
{% endfor %}</tr>{% for row in d.summary %}<tr>{% for v in row.values() %}
<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if d.rows %}<table class="rows"><tr>{% for k in columns %}<th>{{ k }}</th>{% endfor %}</tr>
{% for row in d.rows %}<tr>{% for k in columns %}<td>{% if k == "run_id" and row[k] %}
<a href="?destination={{ d.name }}&run={{ row[k]|urlencode }}">{{ row[k] }}</a>
{% elif k.endswith("_at") or k.endswith("_seen") %}{{ row[k]|when }}
{% else %}{{ row[k] if row[k] is not none else "" }}{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>{% else %}<p class="muted">nothing here</p>{% endif %}
</section>{% endfor %}
{% endblock %}"""

_ENV = Environment(loader=DictLoader({"base": _BASE, "overview": _OVERVIEW, "table": _TABLE}),
                   autoescape=select_autoescape(default=True, default_for_string=True))


def _when(value: str | None) -> str:
    """An ISO timestamp as ``2026-11-29 14:07:14 UTC`` (to the second)."""
    if not value:
        return ""
    try:
        ts = datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return value
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


_ENV.filters["when"] = _when


def render(template: str, **context: Any) -> str:
    """Renders one of the page templates (``overview`` or ``table``)."""
    return _ENV.get_template(template).render(series=CHART_SERIES, **context)
