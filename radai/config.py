"""Settings: one YAML file plus `RADAI_*` environment overrides (nested keys joined by `__`).

Embedded defaults need no file: data in ./radai-data, AE RADAI on port 11112, HTTP on 127.0.0.1:8000.
Validation errors name the bad key (see `load_settings`).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_router.completion import CompletionRules
from radai.errors import ConfigError

_SECTION = ConfigDict(extra="forbid")
_AE = r"^[ -~]{1,16}$"  # DICOM AE title: up to 16 printable ASCII characters


class TlsSettings(BaseModel):
    """DICOM TLS (1.2 or newer). For the receiver: our certificate and key, and the CA that client
    certificates must chain to when `require_client_cert`. For a destination: the CA to verify it against
    (system CAs if omitted) and, for mutual TLS, our certificate and key."""

    model_config = _SECTION
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False
    check_hostname: bool = True


class AllowedPeer(BaseModel):
    """A sender allowed to store: its calling AE title and the IP address or network (CIDR) it comes from."""

    model_config = _SECTION
    ae_title: str = Field(pattern=_AE)
    network: str
    # The sender's name in metrics and the audit log (default: its AE title); senders not listed are 'unlisted'.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=False)  # ValueError names the bad value
        return value


class DicomSettings(BaseModel):
    model_config = _SECTION
    ae_title: str = Field(default="RADAI", pattern=_AE)
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    # Senders allowed to store; null (the embedded default) allows every sender. Refusals are logged.
    allowed_peers: list[AllowedPeer] | None = None
    # Refuse associations addressed to another called AE title than ae_title.
    require_called_ae: bool = True
    tls: TlsSettings | None = None
    max_associations: int = Field(default=16, ge=1, le=1024)
    max_connections: int | None = Field(default=None, ge=1, le=4096)  # default: 4 x max_associations
    acse_timeout_seconds: float = Field(default=30.0, gt=0.0, le=3600.0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0.0, le=3600.0)
    # Idle time allowed between PDUs (and for one PDU or a TLS handshake to arrive): slow peers are dropped.
    network_timeout_seconds: float = Field(default=60.0, gt=0.0, le=3600.0)
    max_pdu_size: int = Field(default=131072, ge=4096, le=2**31 - 1)
    # Largest data set a Deflated transfer syntax may inflate to (deflate bombs get 0xA700).
    max_inflated_bytes: int = Field(default=2 << 30, ge=1 << 20)
    # Largest data set one C-STORE may carry as received (the association is aborted beyond it).
    max_dataset_bytes: int = Field(default=4 << 30, ge=1 << 20)
    # Longest an association may stay open, however active (a peer trickling PDUs cannot hold a slot).
    max_association_seconds: float = Field(default=86400.0, gt=0.0)

    @model_validator(mode="after")
    def _tls_needs_cert(self) -> DicomSettings:
        if self.tls is not None and (self.tls.cert_file is None or self.tls.key_file is None):
            raise ValueError("tls needs cert_file and key_file for the receiver")
        if self.tls is not None and self.tls.require_client_cert and self.tls.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self


OutputKind = Literal["seg", "sr", "sc", "gsps", "notice"]


def _default_outputs() -> list[OutputKind]:
    return ["seg", "sr", "notice"]


class DestinationSettings(BaseModel):
    """A PACS that receives results, and how its outbound queue retries: attempt n (1-based) that fails is
    retried after min(backoff_max_seconds, backoff_initial_seconds * backoff_factor**(n-1)); after
    max_attempts failed attempts the delivery is dead-lettered (`radai studies retry UID` queues it again).
    The older keys `retries` (extra attempts) and `backoff_seconds` are accepted: they set max_attempts to
    retries + 1 and backoff_initial_seconds, unless those are given too.

    `type: dimse` (the default) sends by C-STORE to ae_title@host:port (optionally over `tls`);
    `type: stow` sends by DICOMweb STOW-RS to `{url}/studies`, with HTTP basic (username/password) or
    bearer (token) authentication and `ca_file` to verify an https server (system CAs if omitted).
    ae_title "" and port 0 stand for "not given" (they keep their plain types for the DIMSE sender)."""

    model_config = _SECTION
    name: str = Field(min_length=1, max_length=64)
    type: Literal["dimse", "stow"] = "dimse"
    ae_title: str = Field(default="", pattern=_AE)
    host: str = ""
    port: int = Field(default=0, ge=1, le=65535)
    tls: TlsSettings | None = None
    url: str | None = None
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    token: SecretStr | None = None
    ca_file: Path | None = None
    max_attempts: int = Field(default=20, ge=1, le=1000)
    backoff_initial_seconds: float = Field(default=2.0, ge=0.0, le=86400.0)
    backoff_factor: float = Field(default=2.0, ge=1.0, le=10.0)
    backoff_max_seconds: float = Field(default=300.0, ge=0.0, le=86400.0)
    retries: int | None = Field(default=None, ge=0, le=999)
    backoff_seconds: float | None = Field(default=None, ge=0.0, le=86400.0)
    # Result objects this destination gets: seg, sr (TID 1500), sc (Secondary Capture, overlay burned in),
    # gsps (outlines as a presentation state), notice (an SR when a model did not run on a matching study).
    outputs: list[OutputKind] = Field(default_factory=_default_outputs, min_length=1)
    # SEG encoding: BINARY (every viewer) or LABELMAP (Label Map Segmentation, newer viewers); frames
    # without any segment omitted (smaller) or kept (one frame per source slice and segment).
    seg_type: Literal["binary", "labelmap"] = "binary"
    seg_empty_frames: Literal["omit", "keep"] = "omit"

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("outputs must not repeat a kind")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// address with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not hold credentials (use username/password or token)")
        if parts.query or parts.fragment:
            raise ValueError("url must be the DICOMweb base, without query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _keys_of_the_type(self) -> DestinationSettings:
        given = self.model_fields_set
        dimse_keys = [k for k in ("ae_title", "host", "port", "tls") if k in given]
        stow_keys = [k for k in ("url", "username", "password", "token", "ca_file") if k in given]
        if self.type == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if k not in given]
            if missing:
                raise ValueError(f"type dimse needs ae_title, host and port (missing: {', '.join(missing)})")
            if stow_keys:
                raise ValueError(f"{', '.join(stow_keys)}: only for type stow")
            return self
        if self.url is None:
            raise ValueError("type stow needs url (the DICOMweb base, http:// or https://)")
        if dimse_keys:
            raise ValueError(f"{', '.join(dimse_keys)}: only for type dimse")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.token is not None and self.username is not None:
            raise ValueError("give either username/password or token, not both")
        if self.ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("ca_file needs an https:// url")
        return self

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


class SeriesMatch(BaseModel):
    """A series a study must hold before it counts as complete (all given fields must hold)."""

    model_config = _SECTION
    modality: list[str] = Field(default_factory=list)
    series_description: str | None = None  # regex, case-insensitive search
    body_part: str | None = None
    orientation: str | None = None
    min_slices: int = Field(default=1, ge=1)
    image_type: list[str] = Field(default_factory=list)


class CompletionSettings(BaseModel):
    """When a study counts as complete: shortly after the sender releases its association (the main signal),
    or after a quiet period without new instances (the fallback for senders that trickle or abort); with
    optional required series (all_of / any_of) and a hard deadline that processes or discards what came."""

    model_config = _SECTION
    study_quiet_seconds: float = Field(default=30.0, gt=0.0)
    # Grace after an association's release for a follow-up association of the same study; null disables
    # the release signal (quiet period only).
    association_grace_seconds: float | None = Field(default=1.0, ge=0.0, le=3600.0)
    series_quiet_seconds: float | None = Field(default=None, ge=0.0)
    all_of: list[SeriesMatch] = Field(default_factory=list)
    any_of: list[SeriesMatch] = Field(default_factory=list)
    deadline_seconds: float | None = Field(default=None, gt=0.0)
    on_deadline: Literal["process", "discard"] = "process"

    @model_validator(mode="after")
    def _rules_hold_together(self) -> CompletionSettings:
        self.rules()  # the router's own validation: ValueError says which combination is wrong
        return self

    def rules(self) -> CompletionRules:
        return CompletionRules.from_mapping(self.model_dump())


class StorageSettings(BaseModel):
    model_config = _SECTION
    data_dir: Path = Path("./radai-data")
    # The receiver answers 0xA700 (out of resources) rather than fill the disk past either limit.
    spool_max_used_fraction: float = Field(default=0.95, gt=0.0, le=1.0)
    spool_min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def database(self) -> Path:
        return self.data_dir / "radai.sqlite"

    @property
    def failed_dir(self) -> Path:
        return self.data_dir / "failed"


# Words of sample configurations; a secret containing one was copied, not generated.
_PLACEHOLDERS = ("changeme", "change-me", "change_me", "example", "default", "password")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiSettings(BaseModel):
    model_config = _SECTION
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer tokens. admin: every write (model uploads, activation, retries) and every read; unset, writes
    # answer 403. read: the read routes. With either set, reads need a token; health and /metrics stay open.
    admin_token: SecretStr | None = None
    read_token: SecretStr | None = None

    @field_validator("admin_token", "read_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        if len(secret) < 16:
            raise ValueError("must be at least 16 characters (use a random secret)")
        lowered = secret.lower()
        if len(set(secret)) < 6 or any(word in lowered for word in _PLACEHOLDERS):
            raise ValueError("looks like a placeholder or default secret; use a random one")
        return value

    @model_validator(mode="after")
    def _not_exposed_without_a_secret(self) -> ApiSettings:
        if self.admin_token is None and not _loopback(self.host):
            raise ValueError(
                f"listening on {self.host} beyond loopback needs api.admin_token (and api.read_token for "
                "read-only clients); or keep api.host on 127.0.0.1"
            )
        return self


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
    # The registry of installed packages (`radai models add`); empty means <storage.data_dir>/models.
    registry_dir: Path | None = None
    # How often a running server looks for activations, new versions and removals.
    poll_seconds: float = Field(default=2.0, gt=0.0, le=3600.0)
    # Largest package archive `POST /api/v1/models` accepts (compressed and unpacked).
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024)

    def search_paths(self) -> list[Path]:
        if self.paths:
            return list(self.paths)
        bundled = bundled_models_dir()
        return [bundled] if bundled else []


class PriorityRule(BaseModel):
    """Studies matching every given field get `priority` (the first matching rule wins; default routine)."""

    model_config = _SECTION
    priority: Literal["stat", "routine", "background"]
    calling_ae: str | None = Field(default=None, pattern=_AE)  # the sending AE title, exactly
    modality: list[str] = Field(default_factory=list)  # of the series the job runs on
    series_description: str | None = None  # regex, searched case-insensitively

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class SchedulerSettings(BaseModel):
    model_config = _SECTION
    max_wait_seconds: float = Field(default=0.05, ge=0.0, le=10.0)
    # A waiting job moves up one lane (background -> routine -> stat) per this many seconds.
    aging_seconds: float = Field(default=30.0, gt=0.0, le=86400.0)
    # A batch not back from the runtime in this time fails its jobs; the scheduler goes on serving.
    inference_timeout_seconds: float = Field(default=600.0, gt=0.0, le=86400.0)
    # Backend `tensorrt`: build fp16 engines (faster, slightly different scores). Engines are cached under
    # <data_dir>/tensorrt.
    tensorrt_fp16: bool = False
    # Batches of one model running at once; default: 2 on a CUDA device (copies and host work overlap the
    # other batch's compute), 1 on a CPU (patches gather into full batches while the runner is busy).
    batches_in_flight: int | None = Field(default=None, ge=1, le=8)
    # Backend `triton`: the Triton Inference Server (HTTP) serving the models under their card ids.
    triton_url: str | None = None
    priorities: list[PriorityRule] = Field(default_factory=list)
    job_workers: int = Field(default=4, ge=1, le=64)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda)$")
    # Share of a GPU's free memory (measured when a model loads) its batches may take: a model's batch is
    # lowered below its card's `runtime.max_batch` where that many windows would not fit (torch backend).
    gpu_memory_fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    # Time each model when it loads at batch 1, 2, 4, ... up to that batch and serve the smallest batch that
    # runs within 5% of the fastest: `auto` where the model runs on CUDA, `on` everywhere, `off`.
    batch_tuning: Literal["auto", "on", "off"] = "auto"
    # Jobs resample, window and blend on the model's GPU (tensors; only the label map comes back to the host)
    # where every runner of the model takes tensors on CUDA; false keeps that work on the host.
    device_path: bool = True
    # Several devices (e.g. [cuda:0, cuda:1]): each model gets a runner on every one, all serving its queue.
    devices: list[Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$")]] = Field(default_factory=list)


class ScaleOutSettings(BaseModel):
    """How radai runs: `embedded` (the default) is one process with SQLite and a local spool; `distributed`
    keeps study and job state in PostgreSQL, queues jobs on one Redis stream per model (consumer groups,
    acknowledged after the results are delivered; a job left unacknowledged `claim_idle_seconds` by a dead
    worker is claimed by another) and needs `storage.data_dir` on a volume every process shares. `role` picks
    what this process does: `all`, `receiver` (DICOM SCP, assembly, HTTP API) or `worker` (inference and
    delivery)."""

    model_config = _SECTION
    mode: Literal["embedded", "distributed"] = "embedded"
    role: Literal["all", "receiver", "worker"] = "all"
    database_url: SecretStr | None = None  # postgresql://user:password@host:5432/radai
    redis_url: SecretStr | None = None  # redis://[:password@]host:6379/0 (rediss:// for TLS)
    stream_prefix: str = Field(default="radai", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    consumer_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")  # default host-pid
    claim_idle_seconds: float = Field(default=300.0, gt=0.0, le=86400.0)
    # A receiver's unfinished part of a study that got nothing this long (the receiver went away for good)
    # no longer holds the study back: the other receivers' parts are planned without it.
    abandoned_part_seconds: float = Field(default=3600.0, gt=0.0, le=7 * 86400.0)

    @model_validator(mode="after")
    def _distributed_needs_servers(self) -> ScaleOutSettings:
        if self.mode == "distributed" and (self.database_url is None or self.redis_url is None):
            raise ValueError("mode distributed needs scaleout.database_url and scaleout.redis_url")
        if self.mode == "embedded" and self.role != "all":
            raise ValueError("role receiver or worker needs mode distributed")
        return self


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
    scaleout: ScaleOutSettings = ScaleOutSettings()

    @property
    def registry_dir(self) -> Path:
        return self.models.registry_dir or self.storage.data_dir / "models"

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
