from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
    # The Helm values examples of "Deploy on Kubernetes" and "Scale out" are rendered by tests/deploy.
    start = readme.index("\n## Deploy on Kubernetes\n")
    end = readme.find("\n## ", readme.index("\n## Scale out\n") + 1)
    readme = readme[:start] + (readme[end:] if end >= 0 else "")
    blocks = readme.split("```yaml\n")[1:]
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        cfg = tmp_path / f"example{i}.yaml"
        cfg.write_text(block.split("```")[0])
        load_settings(cfg)  # raises ConfigError naming the key if an example drifted from the settings


def _destination_error(tmp_path: Path, destination: dict[str, object]) -> str:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(yaml.safe_dump({"destinations": [destination]}))
    with pytest.raises(ConfigError) as refused:
        load_settings(cfg)
    return str(refused.value)


def test_a_destination_without_a_type_is_dimse_with_its_keys_unchanged(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(ADMIN_FILE)
    (dest,) = load_settings(cfg).destinations
    assert (dest.type, dest.ae_title, dest.host, dest.port, dest.tls, dest.url) == (
        "dimse",
        "PACS",
        "10.0.0.5",
        104,
        None,
        None,
    )
    assert (dest.max_attempts, dest.backoff_initial_seconds, dest.backoff_max_seconds) == (20, 2.0, 300.0)


def test_a_dimse_destination_needs_ae_title_host_and_port(tmp_path: Path) -> None:
    message = _destination_error(tmp_path, {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5"})
    assert (
        "'destinations.0'" in message
        and "type dimse needs ae_title, host and port (missing: port)" in message
    )


def test_a_stow_destination_needs_a_url(tmp_path: Path) -> None:
    message = _destination_error(tmp_path, {"name": "web", "type": "stow"})
    assert "'destinations.0'" in message and "type stow needs url" in message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://pacs.example.org/dicom-web", "http:// or https://"),
        ("pacs.example.org/dicom-web", "http:// or https://"),
        ("https:///dicom-web", "with a host"),
        ("https://radai:secret@pacs.example.org/dicom-web", "must not hold credentials"),
        ("https://pacs.example.org/dicom-web?x=1", "without query"),
    ],
)
def test_a_bad_stow_url_is_refused_naming_the_key(tmp_path: Path, url: str, reason: str) -> None:
    message = _destination_error(tmp_path, {"name": "web", "type": "stow", "url": url})
    assert "'destinations.0.url'" in message and reason in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"host": "10.0.0.5"}, "host: only for type dimse"),
        ({"username": "radai"}, "username and password go together"),
        ({"username": "radai", "password": "pw", "token": "t"}, "either username/password or token"),
        ({"ca_file": "ca.pem"}, "ca_file needs an https:// url"),
    ],
)
def test_stow_keys_that_do_not_fit_together_are_refused(
    tmp_path: Path, keys: dict[str, object], reason: str
) -> None:
    message = _destination_error(
        tmp_path, {"name": "web", "type": "stow", "url": "http://127.0.0.1:8042/dicom-web", **keys}
    )
    assert reason in message


def test_stow_keys_on_a_dimse_destination_are_refused(tmp_path: Path) -> None:
    dest = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104, "url": "http://h/dicom-web"}
    assert "url: only for type stow" in _destination_error(tmp_path, dest)


def test_a_stow_destination_loads_and_keeps_its_secrets_out_of_text(tmp_path: Path) -> None:
    cfg = tmp_path / "radai.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "destinations": [
                    {
                        "name": "web",
                        "type": "stow",
                        "url": "https://pacs.example.org/dicom-web/",
                        "username": "radai",
                        "password": "hunter2-secret",
                        "max_attempts": 5,
                    }
                ]
            }
        )
    )
    (dest,) = load_settings(cfg).destinations
    assert (dest.type, dest.url, dest.username, dest.max_attempts) == (
        "stow",
        "https://pacs.example.org/dicom-web",
        "radai",
        5,
    )
    assert dest.password is not None and dest.password.get_secret_value() == "hunter2-secret"
    assert "hunter2" not in repr(dest) and "hunter2" not in dest.model_dump_json()


def test_receiver_limits_in_the_settings_reach_the_dicom_scp(tmp_path: Path) -> None:
    from radai.app import scp_options

    cfg = tmp_path / "radai.yaml"
    cfg.write_text(
        "dicom: {max_associations: 3, network_timeout_seconds: 5, max_pdu_size: 65536,\n"
        "        max_inflated_bytes: 1048576, max_dataset_bytes: 2097152, max_association_seconds: 600}\n"
    )
    options = scp_options(load_settings(cfg).dicom)
    assert (options.max_associations, options.network_timeout_s, options.max_pdu_size) == (3, 5.0, 65536)
    assert (options.max_inflated_bytes, options.max_message_bytes, options.max_association_s) == (
        1048576,
        2097152,
        600.0,
    )
