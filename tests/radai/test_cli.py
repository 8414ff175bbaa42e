"""The `radai` command as a user runs it: one-line errors, non-zero exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import radai

ROOT = Path(__file__).resolve().parents[2]
CT_PACKAGE = ROOT / "model_zoo" / "ct_body_classical"


def radai_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    return subprocess.run(
        [sys.executable, "-m", "radai", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    run = radai_cli("--version", cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == f"radai {radai.__version__}"


def test_models_list_shows_the_bundled_models(tmp_path: Path) -> None:
    run = radai_cli("models", "list", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ct-body-classical@1.0.0" in run.stdout


def test_models_validate_accepts_a_good_package(tmp_path: Path) -> None:
    run = radai_cli("models", "validate", str(CT_PACKAGE), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "valid" in run.stdout


def test_models_validate_rejects_tampered_weights_in_one_line(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    subprocess.run(["cp", "-r", str(CT_PACKAGE), str(pkg)], check=True)
    with (pkg / "model.onnx").open("ab") as f:
        f.write(b"\0")
    run = radai_cli("models", "validate", str(pkg), cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("error:") and "sha256" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_bad_config_names_the_key_and_exits_non_zero(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text("dicom: {port: 99999}\n")
    run = radai_cli("serve", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 1
    assert "dicom.port" in run.stderr and "Traceback" not in run.stderr


def test_studies_list_without_a_database_says_so(tmp_path: Path) -> None:
    run = radai_cli("studies", "list", cwd=tmp_path)
    assert run.returncode == 1 and "no database" in run.stderr and "Traceback" not in run.stderr


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    run = radai_cli("bogus", cwd=tmp_path)
    assert run.returncode == 2 and "No such command" in run.stderr and "Traceback" not in run.stderr


def test_demo_writes_seg_sr_and_an_overlay_from_the_bundled_sample(tmp_path: Path) -> None:
    run = radai_cli("demo", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    written = sorted(p.name.split("_")[0] for p in (tmp_path / "demo").iterdir())
    assert written == ["SEG", "SR", "overlay.png"]
    volumes = dict(line.split(": ") for line in run.stdout.splitlines() if line.endswith(" mL"))
    # the bundled T1 crop: several hundred mL each of white and grey matter
    assert 200 < float(volumes["White matter"].split()[0]) < 1500
    assert 200 < float(volumes["Grey matter"].split()[0]) < 1500
    assert "not for clinical use" in run.stdout
