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
from radai.errors import RadaiError

if TYPE_CHECKING:
    from radai.storage.sqlite import SqliteJobStore

app = typer.Typer(add_completion=False, no_args_is_help=True, help="radai: radiology AI inference server.")
models_app = typer.Typer(no_args_is_help=True, help="Model packages: list and validate.")
studies_app = typer.Typer(no_args_is_help=True, help="Studies received, their jobs and deliveries.")
app.add_typer(models_app, name="models")
app.add_typer(studies_app, name="studies")

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
) -> None:
    from radai.logs import configure

    configure(log_level)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the DICOM receiver, the inference workers and the HTTP API until interrupted."""
    from radai.app import serve as run

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


@models_app.command("list")
def models_list(config: ConfigOpt = None) -> None:
    """List the model packages the server would serve."""
    from radai.models.registry import discover

    settings = _settings(config)
    packages = discover(settings.models.search_paths(), settings.models.enabled)
    if not packages:
        typer.echo("no model packages found")
        return
    for p in packages:
        c = p.card
        typer.echo(f"{c.id}@{c.version}\t{c.task}\t{c.modality}/{c.body_part}\t{c.kind}\t{c.name}")


@models_app.command("validate")
def models_validate(path: Annotated[Path, typer.Argument(help="A model package folder.")]) -> None:
    """Check a package: card schema, files, checksum, and a test inference on its reference input."""
    from radai.app import make_runner_factory
    from radai.models.registry import open_package, reference_check

    pkg = open_package(path)
    diff = reference_check(pkg, make_runner_factory("cpu"))
    typer.echo(f"{pkg.key}: valid (reference max abs diff {diff:.2e} <= {pkg.card.reference.atol})")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _store(config: Path | None) -> SqliteJobStore:
    from radai.storage.sqlite import SqliteJobStore

    db = _settings(config).storage.database
    if not db.is_file():
        raise RadaiError(f"no database at {db}: has `radai serve` run with this data_dir?")
    return SqliteJobStore(db)


@studies_app.command("list")
def studies_list(
    config: ConfigOpt = None, limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50
) -> None:
    """List studies, newest first, with their state and jobs."""
    studies = _store(config).list_studies(limit)
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
