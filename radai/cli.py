"""The `radai` command. The only place that exits the process; user errors are one line, no traceback."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import radai
from radai.config import Settings, load_settings
from radai.domain import StudyState
from radai.errors import RadaiError

if TYPE_CHECKING:
    from radai.audit import AuditLog
    from radai.storage.model_store import Entry, ModelStore
    from radai.storage.sql_jobs import SqlJobStore

app = typer.Typer(add_completion=False, no_args_is_help=True, help="radai: radiology AI inference server.")
models_app = typer.Typer(
    no_args_is_help=True,
    help="Model registry: add, list, show, activate, shadow, remove and validate model packages.",
)
studies_app = typer.Typer(no_args_is_help=True, help="Studies received, their jobs and deliveries.")
app.add_typer(models_app, name="models")
app.add_typer(studies_app, name="studies")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log: who did what, when (append-only).")
app.add_typer(audit_app, name="audit")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (RADAI_* environment variables override it)."),
]


def _settings(config: Path | None) -> Settings:
    return load_settings(config)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"radai {radai.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            envvar="RADAI_LOG_FORMAT",
            help="text (one line per record) or json (one JSON object per line, for log collectors).",
        ),
    ] = "text",
) -> None:
    from radai.logs import configure

    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"{log_format!r} is not text or json", param_hint="--log-format")
    configure(log_level, log_format)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the DICOM receiver, the inference workers and the HTTP API until interrupted."""
    from radai.server import serve as run

    run(_settings(config))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the SEG, SR and overlay PNG.")] = Path(
        "radai-demo"
    ),
    nifti: Annotated[
        Path | None, typer.Option("--input", help="A T1 brain MRI (NIfTI) instead of the bundled sample.")
    ] = None,
) -> None:
    """Run the whole pipeline on a bundled brain MRI and write the results and an overlay PNG."""
    from radai.demo import run_demo

    typer.echo("radai demo: building a DICOM MR series from the bundled T1 sample and segmenting it ...")
    result = run_demo(out, nifti)
    for path in result.files:
        typer.echo(f"wrote {path}")
    typer.echo(f"wrote {result.overlay}")
    for name, ml in result.volumes_ml.items():
        typer.echo(f"{name}: {ml:.0f} mL")
    typer.echo("AI result, not verified: not for clinical use.")


def _registry(config: Path | None) -> ModelStore:
    from radai.app import model_store

    return model_store(_settings(config))


def _database_url(settings: Settings) -> str | None:
    """PostgreSQL's URL in scale-out mode; None for the embedded SQLite database."""
    url = settings.scaleout.database_url
    return url.get_secret_value() if settings.scaleout.mode == "distributed" and url is not None else None


def _open_audit(settings: Settings, must_exist: bool = True) -> AuditLog:
    """The audit log of the database `radai serve` uses with these settings."""
    url = _database_url(settings)
    if url is not None:
        from radai.storage.postgres import PostgresAuditLog

        return PostgresAuditLog(url)
    from radai.storage.sqlite_audit import SqliteAuditLog

    db = settings.storage.database
    if must_exist and not db.is_file():
        raise RadaiError(f"no database at {db}: has `radai serve` run with this data_dir?")
    return SqliteAuditLog(db)


def _audit(config: Path | None, event: str, subject: str, outcome: str = "ok") -> None:
    """One audit record for a registry change made on the command line (actor `cli:<login name>`)."""
    from radai.audit import Auditor, Event, cli_actor

    log = _open_audit(_settings(config), must_exist=False)
    try:
        Auditor(log)(Event(event), cli_actor(), subject, outcome)
    finally:
        log.close()


def _describe(entry: Entry) -> str:
    c = entry.package.card
    state = "active" if entry.active else "shadow" if entry.shadow else "-"
    return f"{c.key}\t{state}\t{entry.source}\t{c.task}\t{c.modality}/{c.body_part}\t{c.kind}\t{c.name}"


@models_app.command("list")
def models_list(config: ConfigOpt = None) -> None:
    """List every registered model version: whether it is active or in shadow, and where it comes from."""
    entries = _registry(config).entries()
    if not entries:
        typer.echo("no model packages found")
    for entry in entries:
        typer.echo(_describe(entry))


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="ID (its active version) or ID@VERSION.")],
    config: ConfigOpt = None,
) -> None:
    """Show one model version's card summary and state as JSON."""
    from radai.app import model_view

    typer.echo(json.dumps(model_view(_registry(config).find(ref)), indent=2))


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="A model package folder, or a .zip / .tar.gz of one.")],
    config: ConfigOpt = None,
) -> None:
    """Validate a package and register it. The first version of a model becomes active; a later version waits
    for `radai models activate`. A running server picks the change up without a restart."""
    import tempfile

    from radai.app import make_validator
    from radai.models.archive import ArchiveLimits, extract_package

    settings = _settings(config)
    registry = _registry(config)
    if not path.is_file() and not path.is_dir():
        raise RadaiError(f"{path}: no such package folder or archive")
    typer.echo(f"validating {path.name} (schema, files, checksum, ONNX graph, reference inference) ...")
    with tempfile.TemporaryDirectory(prefix="radai-add-") as tmp:
        folder = path
        if path.is_file():
            limits = ArchiveLimits(max_total_bytes=settings.models.max_upload_bytes)
            folder = extract_package(path, Path(tmp) / "unpacked", limits)
        added = registry.add(folder, make_validator(settings.scheduler.device))
    entry = added.entry
    if added.new:
        _audit(config, "model.added", entry.key)
    if not added.new:
        typer.echo(f"{entry.key}: already registered with the same weights; nothing changed")
    elif entry.active:
        typer.echo(f"{entry.key}: registered and active")
    else:
        typer.echo(f"{entry.key}: registered; activate it with `radai models activate {entry.key}`")


@models_app.command("activate")
def models_activate(ref: Annotated[str, typer.Argument(help="ID@VERSION")], config: ConfigOpt = None) -> None:
    """Switch new jobs of a model to this version; jobs already running finish on theirs."""
    entry = _registry(config).activate(ref)
    _audit(config, "model.activated", entry.key)
    typer.echo(f"{entry.key}: active (a running server switches within models.poll_seconds)")


@models_app.command("shadow")
def models_shadow(
    ref: Annotated[str, typer.Argument(help="ID@VERSION to run in shadow, or ID with --off.")],
    off: Annotated[bool, typer.Option("--off", help="Stop the shadow run of model ID.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a version in shadow of the active one: on live studies, results compared (Dice / matched findings,
    in the study record and metrics), never sent."""
    registry = _registry(config)
    if off:
        from radai.storage.model_store import parse_ref

        model_id, _ = parse_ref(ref)
        if not registry.clear_shadow(model_id):
            raise RadaiError(f"model {model_id!r} has no shadow version")
        _audit(config, "model.shadow", model_id, "off")
        typer.echo(f"{model_id}: shadow run stopped")
        return
    entry = registry.set_shadow(ref)
    _audit(config, "model.shadow", entry.key, "on")
    typer.echo(f"{entry.key}: runs in shadow of the active version; its results are never sent")


@models_app.command("remove")
def models_remove(
    ref: Annotated[str, typer.Argument(help="ID (every version) or ID@VERSION.")], config: ConfigOpt = None
) -> None:
    """Remove a version (not the active one while others exist) or a whole model. Bundled models are disabled,
    not deleted. Running jobs finish on the version they hold."""
    for item in _registry(config).remove(ref):
        _audit(config, "model.removed", item)
        typer.echo(f"removed {item}")


@models_app.command("validate")
def models_validate(path: Annotated[Path, typer.Argument(help="A model package folder.")]) -> None:
    """Run every registration check on a package without registering it: nothing that unpickles, card schema,
    files, checksum, ONNX graph against the card, and a test inference on its reference input."""
    from radai.app import make_runner_factory
    from radai.models.registry import validate_package

    if not path.is_dir():
        raise RadaiError(f"{path}: no such package folder")
    pkg, diff = validate_package(path, make_runner_factory("cpu"))
    typer.echo(f"{pkg.key}: valid (reference max abs diff {diff:.2e} <= {pkg.card.reference.atol})")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _store(config: Path | None) -> SqlJobStore:
    """The job store `radai serve` uses with these settings (PostgreSQL in scale-out mode)."""
    settings = _settings(config)
    url = _database_url(settings)
    if url is not None:
        from radai.storage.postgres import PostgresJobStore

        return PostgresJobStore(url)
    from radai.storage.sqlite import SqliteJobStore

    db = settings.storage.database
    if not db.is_file():
        raise RadaiError(f"no database at {db}: has `radai serve` run with this data_dir?")
    return SqliteJobStore(db)


def _epoch(value: str | None, option: str) -> float | None:
    """An ISO 8601 date or date-time as epoch seconds; without a timezone it is UTC (as this command prints)."""
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 date or date-time", param_hint=option
        ) from exc
    aware = when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    return (aware - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds()


@studies_app.command("list")
def studies_list(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    state: Annotated[
        StudyState | None,
        typer.Option(help="Only studies in this state.", case_sensitive=False),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Only studies with a job of this model: ID (every version) or ID@VERSION."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only studies complete at or after this ISO 8601 date or date-time, e.g. 2026-11-23 or "
            "2026-11-23T08:00:00+01:00 (without a timezone: UTC)."
        ),
    ] = None,
) -> None:
    """List studies, newest first, with their state and jobs; optionally filtered by state, model and time."""
    studies = _store(config).list_studies(limit, state=state, model=model, since=_epoch(since, "--since"))
    if not studies:
        typer.echo("no studies yet")
    for s in studies:
        jobs = ", ".join(f"{j.model_key}:{j.state.value}" for j in s.jobs) or "-"
        typer.echo(f"{s.study_uid}\t{s.state.value}\t{_when(s.completed_at)}\t{s.instances} inst\t{jobs}")


@studies_app.command("show")
def studies_show(
    uid: Annotated[str, typer.Argument(help="StudyInstanceUID")], config: ConfigOpt = None
) -> None:
    """Show one study: its jobs, stage timestamps, batches, outcome, and each delivery's state per
    destination (attempts, next attempt, last error)."""
    from dataclasses import asdict

    typer.echo(json.dumps(asdict(_store(config).get_study(uid)), indent=2, default=str))


@studies_app.command("retry")
def studies_retry(
    uid: Annotated[str, typer.Argument(help="StudyInstanceUID")], config: ConfigOpt = None
) -> None:
    """Queue a study's dead-lettered deliveries again (attempts reset); a running server sends them."""
    import time

    from radai.errors import NotFoundError

    store = _store(config)
    try:
        count = store.retry_dead(uid, time.time())
    finally:
        store.close()
    if not count:
        raise NotFoundError(f"study {uid} has no dead-lettered deliveries")
    typer.echo(f"queued {count} dead-lettered deliveries again; a running `radai serve` sends them")


@audit_app.command("list")
def audit_list(
    config: ConfigOpt = None,
    event: Annotated[str | None, typer.Option(help="Only this event, e.g. model.activated.")] = None,
    after: Annotated[int, typer.Option(help="Records after this sequence number.")] = 0,
    limit: Annotated[int, typer.Option(help="How many, oldest first.")] = 100,
) -> None:
    """Audit records, oldest first: sequence number, time (UTC), event, actor, subject, outcome, details."""
    from radai.audit import AuditQuery, Event

    if event is not None and event not in {e.value for e in Event}:
        raise RadaiError(f"unknown event {event!r}; one of: {', '.join(e.value for e in Event)}")
    log = _open_audit(_settings(config))
    try:
        records = log.records(AuditQuery(event=event, after=after, limit=limit))
    finally:
        log.close()
    if not records:
        typer.echo("no audit records")
    for r in records:
        details = " ".join(f"{k}={v}" for k, v in r.detail.items())
        typer.echo(
            f"{r.seq}\t{_when(r.at)}\t{r.event}\t{r.actor}\t{r.subject}\t{r.outcome}\t{details}".rstrip()
        )


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None) -> None:
    """Check the audit log's hash chain: fails naming the first record changed or removed outside radai."""
    log = _open_audit(_settings(config))
    try:
        count = log.verify()
    finally:
        log.close()
    typer.echo(f"audit log intact: {count} records, hash chain unbroken")


def main() -> None:
    # torch's OpenMP threads spin-wait by default and then compete with ONNX Runtime's threads for the same
    # cores (measured in benchmarks/README.md); passive waiting must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        rc = app(standalone_mode=False)
    except RadaiError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: typer prints them with the usage line
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except Exception as exc:
        logging.getLogger("radai").debug("unexpected error", exc_info=True)
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)
