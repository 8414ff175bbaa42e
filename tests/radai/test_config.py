from __future__ import annotations

from pathlib import Path

import pytest

from radai.config import load_settings
from radai.errors import ConfigError

ADMIN_FILE = """\
dicom:        {ae_title: RADAI, host: 0.0.0.0, port: 11112}
destinations: [{name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}]
completion:   {study_quiet_seconds: 30}
storage:      {data_dir: ./radai-data}
api:          {host: 127.0.0.1, port: 8000}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RADAI_"):
            monkeypatch.delenv(key)


def test_embedded_defaults_need_no_file() -> None:
    s = load_settings()
    assert (s.dicom.ae_title, s.dicom.port, s.api.port) == ("RADAI", 11112, 8000)
    assert s.storage.data_dir == Path("radai-data")
    assert s.completion.study_quiet_seconds == 30


def test_administrators_minimal_file_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(ADMIN_FILE)
    s = load_settings(cfg)
    assert s.destinations[0].ae_title == "PACS" and s.destinations[0].port == 104


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(ADMIN_FILE)
    monkeypatch.setenv("RADAI_DICOM__PORT", "4242")
    s = load_settings(cfg)
    assert s.dicom.port == 4242
    assert s.dicom.ae_title == "RADAI"  # the rest of the section still comes from the file


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text("dicom: {port: 70000}\n")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_settings(cfg)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text("dicom: {aetitle: RADAI}\n")
    with pytest.raises(ConfigError, match=r"dicom\.aetitle"):
        load_settings(cfg)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")


def test_every_yaml_example_in_the_readme_is_a_valid_config(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = readme.split("```yaml\n")[1:]
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        cfg = tmp_path / f"example{i}.yaml"
        cfg.write_text(block.split("```")[0])
        load_settings(cfg)  # raises ConfigError naming the key if an example drifted from the settings
