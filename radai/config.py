"""Settings: one YAML file plus `RADAI_*` environment overrides (nested keys joined by `__`).

Embedded defaults need no file: data in ./radai-data, AE RADAI on port 11112, HTTP on 127.0.0.1:8000.
Validation errors name the bad key (see `load_settings`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from radai.errors import ConfigError

_SECTION = ConfigDict(extra="forbid")
_AE = r"^[ -~]{1,16}$"  # DICOM AE title: up to 16 printable ASCII characters


class DicomSettings(BaseModel):
    model_config = _SECTION
    ae_title: str = Field(default="RADAI", pattern=_AE)
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)


class DestinationSettings(BaseModel):
    """A PACS that receives results, and how its outbound queue retries: attempt n (1-based) that fails is
    retried after min(backoff_max_seconds, backoff_initial_seconds * backoff_factor**(n-1)); after
    max_attempts failed attempts the delivery is dead-lettered (`radai studies retry UID` queues it again).
    The older keys `retries` (extra attempts) and `backoff_seconds` are accepted: they set max_attempts to
    retries + 1 and backoff_initial_seconds, unless those are given too."""

    model_config = _SECTION
    name: str = Field(min_length=1, max_length=64)
    ae_title: str = Field(pattern=_AE)
    host: str
    port: int = Field(ge=1, le=65535)
    max_attempts: int = Field(default=20, ge=1, le=1000)
    backoff_initial_seconds: float = Field(default=2.0, ge=0.0, le=86400.0)
    backoff_factor: float = Field(default=2.0, ge=1.0, le=10.0)
    backoff_max_seconds: float = Field(default=300.0, ge=0.0, le=86400.0)
    retries: int | None = Field(default=None, ge=0, le=999)
    backoff_seconds: float | None = Field(default=None, ge=0.0, le=86400.0)

    @model_validator(mode="after")
    def _map_legacy_keys(self) -> DestinationSettings:
        given = self.model_fields_set
        if self.retries is not None and "max_attempts" not in given:
            self.max_attempts = self.retries + 1
        if self.backoff_seconds is not None and "backoff_initial_seconds" not in given:
            self.backoff_initial_seconds = self.backoff_seconds
        return self


class DeliverySettings(BaseModel):
    """The outbound queue's workers and the destination checks of /readyz."""

    model_config = _SECTION
    # How often each destination's worker looks for due deliveries (it is also woken on enqueue); this is
    # how soon a `radai studies retry` from the command line is picked up.
    poll_seconds: float = Field(default=0.5, gt=0.0, le=60.0)
    # Network timeout of one delivery attempt (association, each C-STORE).
    timeout_seconds: float = Field(default=30.0, gt=0.0, le=3600.0)
    # /readyz C-ECHOes each destination at most this often, with this timeout.
    echo_cache_seconds: float = Field(default=10.0, ge=0.0, le=3600.0)
    echo_timeout_seconds: float = Field(default=3.0, gt=0.0, le=60.0)


class CompletionSettings(BaseModel):
    """When a study counts as complete: shortly after the sender releases its association (the main signal),
    or after a quiet period without new instances (the fallback for senders that trickle or abort)."""

    model_config = _SECTION
    study_quiet_seconds: float = Field(default=30.0, gt=0.0)
    # Grace after an association's release for a follow-up association of the same study; null disables
    # the release signal (quiet period only).
    association_grace_seconds: float | None = Field(default=1.0, ge=0.0, le=3600.0)


class StorageSettings(BaseModel):
    model_config = _SECTION
    data_dir: Path = Path("./radai-data")

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def database(self) -> Path:
        return self.data_dir / "radai.sqlite"

    @property
    def failed_dir(self) -> Path:
        return self.data_dir / "failed"


class ApiSettings(BaseModel):
    model_config = _SECTION
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


def bundled_models_dir() -> Path | None:
    """The model packages shipped with radai (the `model_zoo` distribution folder), found without importing it."""
    spec = importlib.util.find_spec("model_zoo")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class ModelsSettings(BaseModel):
    model_config = _SECTION
    # Folders searched for model packages (a package is a sub-folder holding model.yaml).
    # Empty means: the bundled packages.
    paths: list[Path] = Field(default_factory=list)
    # Model ids to serve; empty means all found.
    enabled: list[str] = Field(default_factory=list)

    def search_paths(self) -> list[Path]:
        if self.paths:
            return list(self.paths)
        bundled = bundled_models_dir()
        return [bundled] if bundled else []


class SchedulerSettings(BaseModel):
    model_config = _SECTION
    max_wait_seconds: float = Field(default=0.05, ge=0.0, le=10.0)
    job_workers: int = Field(default=4, ge=1, le=64)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RADAI_", env_nested_delimiter="__", extra="forbid")

    dicom: DicomSettings = DicomSettings()
    destinations: list[DestinationSettings] = Field(default_factory=list)
    delivery: DeliverySettings = DeliverySettings()
    completion: CompletionSettings = CompletionSettings()
    storage: StorageSettings = StorageSettings()
    api: ApiSettings = ApiSettings()
    models: ModelsSettings = ModelsSettings()
    scheduler: SchedulerSettings = SchedulerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the file (passed as init values), as DESIGN.md promises.
        return (env_settings, init_settings)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from an optional YAML file and the environment; raise ConfigError naming the bad key."""
    values = _read_yaml(path) if path is not None else {}
    try:
        return Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(root)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"invalid setting '{key}': {first['msg']}{more}") from exc
