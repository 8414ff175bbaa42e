"""`GET /status`: a read-only HTML page for operators (studies flowing now, per-stage latencies, queues, models
and destinations' health). Server-rendered HTML with inline CSS, reloading itself every 10 s; no JavaScript.

It needs no token, like /metrics: it shows only aggregates, UID fingerprints (a short hash, never a UID),
model ids and destination names; never a patient value. Every value is HTML-escaped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from prometheus_client import CollectorRegistry

from radai.api.models import ModelAdmin
from radai.api.status_data import (
    RECENT_JOBS,
    RECENT_STUDIES,
    ReadinessCheck,
    Status,
    collect_status,
)
from radai.metrics import REGISTRY
from radai.ports import JobStore

__all__ = ["ReadinessCheck", "render_status", "status_router"]

REFRESH_SECONDS = 10
_NONE = "&ndash;"  # an empty cell
_GOOD = {"done", "delivered", "ok", "up", "active", "ready"}
_BAD = {"failed", "dead-letter", "failing", "down", "not ready"}
_BUSY = {"processing", "running", "queued", "delivering", "complete", "shadow"}

_CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#d9e2ec; --bg:#f5f7fa; --card:#fff; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
  color:var(--fg); background:var(--bg); }
header { background:#102a43; color:#fff; padding:14px 28px; display:flex; align-items:center; gap:18px; }
header h1 { font-size:20px; margin:0; font-weight:600; letter-spacing:.02em; }
header .meta { color:#bcccdc; font-size:13px; margin-left:auto; text-align:right; }
main { padding:20px 28px 32px; max-width:1320px; margin:0 auto; }
section { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:14px 18px;
  margin-bottom:18px; }
h2 { font-size:16px; margin:0 0 4px; color:#102a43; }
h3 { font-size:14px; margin:14px 0 6px; color:#334e68; }
p.note { color:var(--muted); margin:0 0 10px; font-size:12.5px; }
p.empty { color:var(--muted); font-style:italic; margin:6px 0; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:5px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f0f4f8; font-weight:600; color:#334e68; font-size:12.5px; }
td.num, th.num { text-align:right; }
table.compact { width:auto; min-width:360px; }
code { font:12.5px ui-monospace,"DejaVu Sans Mono",monospace; }
.pill { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600;
  background:#e4e7eb; color:#3e4c59; }
.pill.good { background:#e3f9e5; color:#1f7a3a; }
.pill.bad { background:#ffe3e3; color:#a61b1b; }
.pill.busy { background:#e6f0ff; color:#1d4f91; }
header .pill { font-size:13px; padding:3px 12px; }
.tiles { display:flex; flex-wrap:wrap; gap:10px; margin:6px 0 4px; }
.tile { border:1px solid var(--line); border-radius:6px; padding:8px 14px; min-width:110px; }
.tile b { display:block; font-size:20px; }
.tile span { color:var(--muted); font-size:12px; }
.grid { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
"""


def _pill(text: str) -> str:
    kind = "good" if text in _GOOD else "bad" if text in _BAD else "busy" if text in _BUSY else ""
    return f'<span class="pill {kind}">{escape(text)}</span>'


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return _NONE
    if math.isinf(value):
        return "&gt; max bucket"
    if value < 10:
        return f"{value:.2f} s"
    if value < 600:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _utc(at: float | None) -> str:
    return _NONE if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (), css: str = ""
) -> str:
    """A table whose cells are already escaped HTML; columns in `numeric` are right-aligned."""

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    opening = f'<table class="{css}">' if css else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _overall(s: Status) -> str:
    checks = [(n, ok) for n, ok in s.checks.items() if not n.startswith("destination:")]
    rows = [(escape(n), _pill("ok" if ok else "failing")) for n, ok in checks]
    table = (
        _table(("Check", "Result"), rows, css="compact")
        if rows
        else '<p class="empty">No readiness checks.</p>'
    )
    return (
        '<section id="overall"><h2>Overall</h2>'
        f'<p class="note">Ready means every check below passes (as <code>/readyz</code>); destinations are '
        f"reported further down but do not decide readiness.</p>{table}</section>"
    )


def _studies(s: Status) -> str:
    tiles = "".join(
        f'<div class="tile"><b>{n}</b><span>{_pill(state)}</span></div>'
        for state, n in s.study_states.items()
    )
    rows = [
        (
            f"<code>{escape(j.study)}</code>",
            escape(j.model),
            _pill(j.state),
            escape(j.priority),
            escape(j.reason) or _NONE,
            _utc(j.completed_at),
            _seconds(j.end_to_end),
        )
        for j in s.jobs
    ]
    headers = ("Study (fingerprint)", "Model", "State", "Priority", "Reason", "Complete (UTC)", "End-to-end")
    jobs = _table(headers, rows, numeric=(6,)) if rows else '<p class="empty">No studies received yet.</p>'
    return (
        '<section id="studies"><h2>Studies flowing now</h2>'
        '<p class="note">Counts by state of the most recently completed studies '
        f"({s.studies_seen} counted, at most {RECENT_STUDIES}). A study is shown only by its fingerprint, "
        "a short hash of its Study Instance UID.</p>"
        f'<div class="tiles">{tiles}</div><h3>The {RECENT_JOBS} most recent jobs</h3>{jobs}</section>'
    )


def _latencies(s: Status) -> str:
    rows = [
        (escape(r.model), escape(r.stage), str(r.count), _seconds(r.p50), _seconds(r.p95))
        for r in s.latencies
    ]
    headers = ("Model", "Stage", "Jobs", "p50", "p95")
    body = (
        _table(headers, rows, numeric=(2, 3, 4))
        if rows
        else '<p class="empty">No job has passed a stage since this process started.</p>'
    )
    return (
        '<section id="latency"><h2>Per-stage latency</h2>'
        '<p class="note">Time spent in each stage (since the previous one), over the life of this process; '
        "p50 and p95 are estimated from the <code>radai_study_stage_seconds</code> histogram buckets as "
        f"PromQL <code>histogram_quantile</code> does.</p>{body}</section>"
    )


def _queues(s: Status) -> str:
    scheduler = [(escape(m), f"{int(v)}") for m, v in sorted(s.queue_depth.items())]
    delivery = [(escape(d.name), str(d.pending), str(d.dead)) for d in s.destinations]
    first = (
        _table(("Model", "Patches waiting"), scheduler, numeric=(1,))
        if scheduler
        else '<p class="empty">No model has queued patches yet.</p>'
    )
    second = (
        _table(("Destination", "Pending", "Dead-lettered"), delivery, numeric=(1, 2))
        if delivery
        else '<p class="empty">No destinations.</p>'
    )
    return (
        '<section id="queues"><h2>Queues</h2><div class="grid">'
        f"<div><h3>Inference scheduler</h3>{first}</div><div><h3>Outbound deliveries</h3>{second}</div>"
        "</div></section>"
    )


def _models(s: Status) -> str:
    def role(view: dict[str, object]) -> str:
        return "active" if view.get("active") else "shadow" if view.get("shadow") else "inactive"

    rows = [
        (
            escape(str(v.get("id", ""))),
            escape(str(v.get("version", ""))),
            _pill(role(v)),
            escape(str(v.get("name") or "")) or _NONE,
            escape(str(v.get("task") or "")) or _NONE,
            escape(str(v.get("modality") or "")) or _NONE,
        )
        for v in sorted(s.models, key=lambda v: (str(v.get("id")), str(v.get("version"))))
    ]
    headers = ("Model", "Version", "Role", "Name", "Task", "Modality")
    body = _table(headers, rows) if rows else '<p class="empty">No models registered.</p>'
    return f'<section id="models"><h2>Models</h2>{body}</section>'


def _destinations(s: Status) -> str:
    def echo(up: bool | None) -> str:
        return _pill("not checked") if up is None else _pill("up" if up else "down")

    rows = [(escape(d.name), echo(d.up), str(d.pending), str(d.dead)) for d in s.destinations]
    body = (
        _table(("Destination", "Last C-ECHO", "Pending", "Dead-lettered"), rows, numeric=(2, 3))
        if rows
        else '<p class="empty">No destinations configured.</p>'
    )
    return f'<section id="destinations"><h2>Destinations</h2>{body}</section>'


def render_status(s: Status) -> str:
    """The whole page."""
    state = "ready" if s.ready else "not ready"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>radai status: {escape(state)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>radai status</h1><span id="ready">{_pill(state)}</span>'
        f'<div class="meta">radai {escape(s.version)} · {_utc(s.generated_at)} UTC<br>'
        f"refreshes every {REFRESH_SECONDS} s</div></header><main>"
        + _overall(s)
        + _studies(s)
        + _latencies(s)
        + _queues(s)
        + _models(s)
        + _destinations(s)
        + "</main></body></html>"
    )


def status_router(
    store: JobStore, models: ModelAdmin, readiness: ReadinessCheck, *, registry: CollectorRegistry = REGISTRY
) -> APIRouter:
    """The `/status` route; `registry` holds the metrics shown (this process's unless a test gives another)."""
    router = APIRouter(tags=["status"])

    @router.get("/status", response_class=HTMLResponse)
    def status_page() -> HTMLResponse:
        """The operators' status page (HTML, no token needed: aggregates, fingerprints and model ids only)."""
        page = render_status(collect_status(store, models.views, readiness, registry))
        return HTMLResponse(
            page,
            headers={
                "Cache-Control": "no-store",
                # nothing but inline styles: no script, no request to anywhere
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            },
        )

    return router
