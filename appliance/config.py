"""Configuration: environment variables (pydantic-settings) over an optional YAML file.

The environment always wins over the file, so an admin can override one value without editing it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from appliance.governance.tiers import DEFAULT_TIERS, TierConfig
from appliance.upstreams.settings import (
    Objective,
    RouteSettings,
    UpstreamSettings,
    check_references,
    is_http_url,
)
from appliance.upstreams.zones import Zone

if TYPE_CHECKING:
    from appliance.catalog import Route

FallbackPolicy = Literal["never", "on_failure", "on_overload"]

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "appliance"


# OpenAI voice names -> MagpieTTS voices. Other OpenAI names use "default". A voice is carried over to
# another language as the same speaker where the NIM has one (EN-US.Aria -> DE-DE.Aria).
DEFAULT_TTS_VOICES = {
    "default": "Magpie-Multilingual.EN-US.Aria",
    "alloy": "Magpie-Multilingual.EN-US.Aria",
    "echo": "Magpie-Multilingual.EN-US.Jason",
    "fable": "Magpie-Multilingual.EN-US.Leo",
    "onyx": "Magpie-Multilingual.EN-US.Ray",
    "nova": "Magpie-Multilingual.EN-US.Sofia",
    "shimmer": "Magpie-Multilingual.EN-US.Mia",
}


class ConfigError(Exception):
    """Configuration that cannot be used; the message is one line naming the bad setting."""


class ModelOverride(BaseModel):
    """Per-public-model settings from the YAML file (`models: {name: {...}}`)."""

    # A misspelled key here would silently leave the global (wider) policy in force.
    model_config = ConfigDict(extra="forbid")

    cloud_fallback: FallbackPolicy | None = None  # when a request may leave the box
    max_zone: Zone | None = None  # how far it may go: box, district or cloud
    objective: Objective | None = None  # what the district's scheduler is told (llm-d)
    # Stream limits for this model, over the global ones (a large reasoning model may need longer).
    first_token_timeout: float | None = Field(default=None, gt=0)
    stream_idle_timeout: float | None = Field(default=None, gt=0)


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env(name: str, default: Any = None, **constraints: Any) -> Any:
    """A field read from the environment variable `name`, or from its field name in the YAML file."""
    alias = AliasChoices(name, name.lower().removeprefix("appliance_"))
    if callable(default):
        return Field(default_factory=default, validation_alias=alias, **constraints)
    return Field(default=default, validation_alias=alias, **constraints)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", populate_by_name=True, case_sensitive=False)

    # Cloud (NVIDIA NIM).
    nvidia_nim_api_key: SecretStr | None = _env("NVIDIA_NIM_API_KEY")
    nvidia_nim_base_url: str = _env("NVIDIA_NIM_BASE_URL", "https://integrate.api.nvidia.com/v1")
    cloud_fallback: FallbackPolicy | None = _env("APPLIANCE_CLOUD_FALLBACK")
    models: dict[str, ModelOverride] = _env("APPLIANCE_MODELS", dict)

    # Local engines. Several comma-separated LLM URLs are a pool (one vLLM per GPU).
    llm_url: str = _env("APPLIANCE_LLM_URL", "http://127.0.0.1:8000/v1")
    tts_url: str = _env("APPLIANCE_TTS_URL", "http://127.0.0.1:9000")
    # "auto": large-v3 on a GPU, large-v3-turbo on a machine without one (the plan's choice).
    stt_model: str = _env("APPLIANCE_STT_MODEL", "auto")
    data_dir: Path = _env("APPLIANCE_DATA_DIR", DEFAULT_DATA_DIR)

    # Speech-to-text (faster-whisper in-process). Audio never leaves the box.
    stt_device: Literal["auto", "cuda", "cpu"] = _env("APPLIANCE_STT_DEVICE", "auto")
    stt_compute_type: str = _env("APPLIANCE_STT_COMPUTE_TYPE", "auto")  # auto: float16 on CUDA, int8 on CPU
    stt_workers: int = _env("APPLIANCE_STT_WORKERS", 2, ge=1)  # transcriptions the model runs at once
    stt_max_bytes: int = _env("APPLIANCE_STT_MAX_BYTES", 25 * 1024 * 1024, gt=0)  # upload cap, as OpenAI
    stt_max_seconds: float = _env("APPLIANCE_STT_MAX_SECONDS", 1800.0, gt=0)  # audio duration cap
    stt_vad: bool = _env("APPLIANCE_STT_VAD", True)  # skip non-speech in long audio
    stt_batch_size: int = _env("APPLIANCE_STT_BATCH_SIZE", 8, ge=1)  # windows decoded together
    # Requests in progress (upload, decode, inference) before new ones get a 429: bounds memory.
    stt_max_pending: int = _env("APPLIANCE_STT_MAX_PENDING", 16, ge=1)

    # Live dictation (appliance.realtime): OpenAI's Realtime transcription sessions over WebSocket.
    realtime_max_sessions: int = _env("APPLIANCE_REALTIME_MAX_SESSIONS", 30, ge=1)  # open at once
    # New sessions are refused while partial passes wait longer than this for the engine (seconds).
    realtime_max_lag: float = _env("APPLIANCE_REALTIME_MAX_LAG", 1.5, gt=0)
    # Seconds of new audio in an open turn before the next partial pass.
    realtime_partial_interval: float = _env("APPLIANCE_REALTIME_PARTIAL_INTERVAL", 0.5, gt=0)
    realtime_max_turn_seconds: float = _env("APPLIANCE_REALTIME_MAX_TURN_SECONDS", 30.0, gt=1, le=30)
    realtime_max_append_bytes: int = _env("APPLIANCE_REALTIME_MAX_APPEND_BYTES", 1024 * 1024, gt=0)  # decoded
    realtime_idle_timeout: float = _env("APPLIANCE_REALTIME_IDLE_TIMEOUT", 60.0, gt=0)  # s without a message
    realtime_max_session_seconds: float = _env("APPLIANCE_REALTIME_MAX_SESSION_SECONDS", 3600.0, gt=0)
    # A client that leaves this many bytes of events unread, or one send blocked this long, is cut off.
    realtime_send_buffer_bytes: int = _env("APPLIANCE_REALTIME_SEND_BUFFER_BYTES", 1024 * 1024, gt=0)
    realtime_send_timeout: float = _env("APPLIANCE_REALTIME_SEND_TIMEOUT", 10.0, gt=0)

    # Clients.
    api_keys: SecretStr | None = _env("APPLIANCE_API_KEYS")  # comma-separated
    keys_file: Path | None = _env("APPLIANCE_KEYS_FILE")
    max_body_bytes: int = _env("APPLIANCE_MAX_BODY_BYTES", 4 * 1024 * 1024, gt=0)
    # Request line and headers together; past it, 431 (httptools itself would buffer any size).
    max_header_bytes: int = _env("APPLIANCE_MAX_HEADER_BYTES", 64 * 1024, ge=1024)
    # Seconds a connection has to send a whole request head (idle and trickling connections are closed).
    header_timeout: float = _env("APPLIANCE_HEADER_TIMEOUT", 10.0, gt=0)
    # Opens /readyz's detail and /admin/api/, as does the key `appliance admin-key` makes; stored only as
    # its hash (appliance.auth.AdminKeys).
    admin_key: SecretStr | None = _env("APPLIANCE_ADMIN_KEY")
    # The admin console's sign-in lasts this long (then the admin signs in again).
    admin_session_minutes: float = _env("APPLIANCE_ADMIN_SESSION_MINUTES", 60.0, gt=0, le=24 * 60)

    # Governance: tiers (over the defaults free, standard, enterprise), the ledger, the cloud budget.
    tiers: Annotated[dict[str, TierConfig], NoDecode] = _env("APPLIANCE_TIERS", dict)
    default_tier: str = _env("APPLIANCE_DEFAULT_TIER", "enterprise")  # keys without one, env keys
    usage_retention_days: int = _env("APPLIANCE_USAGE_RETENTION_DAYS", 365, ge=1)
    usage_flush_interval: float = _env("APPLIANCE_USAGE_FLUSH_INTERVAL", 2.0, gt=0, le=60)
    nvidia_nim_tier: Literal["free", "standard", "enterprise"] | None = _env("NVIDIA_NIM_TIER")
    nvidia_nim_rpm: int | None = _env("NVIDIA_NIM_RPM", None, gt=0)
    nvidia_nim_tpm: int | None = _env("NVIDIA_NIM_TPM", None, gt=0)

    # Upstream timing (seconds) and resilience.
    connect_timeout: float = _env("APPLIANCE_CONNECT_TIMEOUT", 3.0, gt=0)
    first_byte_timeout: float = _env("APPLIANCE_FIRST_BYTE_TIMEOUT", 120.0, gt=0)
    # Streams: the first event must come within first_token_timeout (failover is still possible until
    # then), each later one within stream_idle_timeout (else the stream is continued elsewhere or ended).
    first_token_timeout: float = _env("APPLIANCE_FIRST_TOKEN_TIMEOUT", 10.0, gt=0)
    stream_idle_timeout: float = _env("APPLIANCE_STREAM_IDLE_TIMEOUT", 15.0, gt=0)
    retry_after_max: float = _env("APPLIANCE_RETRY_AFTER_MAX", 2.0, ge=0)
    breaker_failures: int = _env("APPLIANCE_BREAKER_FAILURES", 3, ge=1)
    breaker_probe_interval: float = _env("APPLIANCE_BREAKER_PROBE_INTERVAL", 5.0, gt=0)
    overload_waiting: int = _env("APPLIANCE_OVERLOAD_WAITING", 16, ge=1)
    overload_poll_interval: float = _env("APPLIANCE_OVERLOAD_POLL_INTERVAL", 1.0, gt=0)

    # Text-to-speech (MagpieTTS NIM at tts_url).
    tts_max_chars: int = _env("APPLIANCE_TTS_MAX_CHARS", 4096, gt=0)  # per request, as OpenAI
    # Text per NIM request. The NIM takes at most 2,000 characters after its own text normalisation
    # (numbers spelled out) and offline synthesis is capped at about 20 s of audio, so stay well below.
    tts_piece_chars: int = _env("APPLIANCE_TTS_PIECE_CHARS", 250, ge=20, le=2000)
    tts_language: str = _env("APPLIANCE_TTS_LANGUAGE", "en-US", pattern=r"^[A-Za-z]{2,3}-[A-Za-z]{2}$")
    tts_voices: Annotated[dict[str, str], NoDecode] = _env(
        "APPLIANCE_TTS_VOICES", lambda: dict(DEFAULT_TTS_VOICES)
    )
    tts_sample_rate: int = _env("APPLIANCE_TTS_SAMPLE_RATE", 22050, ge=8000, le=48000)
    tts_timeout: float = _env("APPLIANCE_TTS_TIMEOUT", 30.0, gt=0)  # for an answer, and between chunks
    tts_health_interval: float = _env("APPLIANCE_TTS_HEALTH_INTERVAL", 5.0, gt=0)
    tts_voices_ttl: float = _env("APPLIANCE_TTS_VOICES_TTL", 300.0, gt=0)
    # Synthesis requests sent to the NIM at once; the rest wait in order. The NIM's default profile
    # batches 8 (TTS NIM 1.8+ profiles serve up to 64 streams, 1.7 and older 5): match the profile.
    tts_max_streams: int = _env("APPLIANCE_TTS_MAX_STREAMS", 8, ge=1)
    tts_max_waiting: int = _env("APPLIANCE_TTS_MAX_WAITING", 64, ge=0)  # then 429 busy at once
    tts_queue_timeout: float = _env("APPLIANCE_TTS_QUEUE_TIMEOUT", 10.0, gt=0)  # longest wait for a turn

    # Upstreams beyond the box's engine and the cloud, and routes to them (appliance.upstreams).
    upstreams: dict[str, UpstreamSettings] = _env("APPLIANCE_UPSTREAMS", dict)
    routes: list[RouteSettings] = _env("APPLIANCE_ROUTES", list)
    # The request header an app may set to keep one conversation on one engine (besides `user`).
    session_header: str = _env("APPLIANCE_SESSION_HEADER", "x-session-id", pattern=r"^[A-Za-z0-9-]+$")
    # The header the district's router keeps sessions by (vLLM Router: X-Session-ID).
    district_session_header: str = _env(
        "APPLIANCE_DISTRICT_SESSION_HEADER", "x-session-id", pattern=r"^[A-Za-z0-9-]+$"
    )

    log_level: Literal["debug", "info", "warning", "error"] = _env("APPLIANCE_LOG_LEVEL", "info")

    # GPU health (appliance.gpu_monitor): seconds between NVML snapshots shown on /readyz; 0 turns it off.
    gpu_refresh_interval: float = _env("APPLIANCE_GPU_REFRESH_INTERVAL", 30.0, ge=0)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tier_table(cls, value: Any) -> Any:
        # The environment holds YAML, as for tts_voices; the file a mapping.
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError("is not valid YAML") from None
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ValueError("must map tier names to their limits")
        return value

    @model_validator(mode="after")
    def _known_default_tier(self) -> Settings:
        if self.default_tier not in self.tiers and self.default_tier not in DEFAULT_TIERS:
            raise ValueError(f"default_tier: unknown tier {self.default_tier!r}")
        return self

    @field_validator("log_level", "cloud_fallback", "stt_device", "stt_compute_type", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("tts_voices", mode="before")
    @classmethod
    def _voice_table(cls, value: Any) -> Any:
        # The environment holds YAML ("{alloy: Magpie-Multilingual.EN-US.Aria}"); the file a mapping.
        # Names it leaves out keep their defaults.
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError("is not valid YAML") from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()
        ):
            raise ValueError("must map voice names to MagpieTTS voice names")
        return {**DEFAULT_TTS_VOICES, **{k.strip().lower(): v.strip() for k, v in value.items()}}

    @field_validator("nvidia_nim_base_url", "tts_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not is_http_url(value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("llm_url")
    @classmethod
    def _http_urls(cls, value: str) -> str:
        urls = [u.strip().rstrip("/") for u in value.split(",")]
        if not all(is_http_url(u) for u in urls):
            raise ValueError("must be an http(s) URL, or several separated by commas")
        return ",".join(urls)

    @field_validator("session_header", "district_session_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _upstream_references(self) -> Settings:
        check_references(self.upstreams, self.routes)
        return self

    @field_validator("nvidia_nim_api_key")
    @classmethod
    def _one_token(cls, value: SecretStr | None) -> SecretStr | None:
        # The key goes into a request header as it is. A trailing newline (a key pasted into a secrets
        # file) is dropped; anything else that could end the header is refused, without echoing it.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError("must be one token, without spaces or control characters")
        return SecretStr(key)

    @field_validator("nvidia_nim_base_url")
    @classmethod
    def _cloud_https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" and not is_loopback_host(parts.hostname):
            raise ValueError("must be https (plain http is allowed only for a loopback host)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = _CONFIG_FILE.get("path")
        if config_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=config_file),)
        return sources

    # Derived values.

    def fallback_policy(self, public_name: str, kind_default: FallbackPolicy) -> FallbackPolicy:
        """The cloud policy for one public model: per-model override, then global, then the kind's default."""
        override = self.models.get(public_name)
        if override is not None and override.cloud_fallback is not None:
            return override.cloud_fallback
        return self.cloud_fallback or kind_default

    def stream_timeouts(self, public_name: str) -> tuple[float, float]:
        """(first token, idle) limits in seconds for streams of one public model."""
        override = self.models.get(public_name)
        if override is None:
            return self.first_token_timeout, self.stream_idle_timeout
        return (
            override.first_token_timeout or self.first_token_timeout,
            override.stream_idle_timeout or self.stream_idle_timeout,
        )

    @property
    def llm_urls(self) -> list[str]:
        return self.llm_url.split(",")

    def fallback_policies(self, routes: Iterable[Route]) -> dict[str, FallbackPolicy]:
        """Public model -> its effective cloud policy (speech defaults to never: no cloud stand-in)."""
        return {
            r.name: self.fallback_policy(r.name, "on_failure" if r.kind == "llm" else "never") for r in routes
        }

    @property
    def client_keys(self) -> list[str]:
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [k.strip() for k in raw.split(",") if k.strip()]

    @property
    def admin_keys(self) -> list[str]:
        key = self.admin_key.get_secret_value().strip() if self.admin_key else ""
        return [key] if key else []

    @property
    def cloud_enabled(self) -> bool:
        return self.nvidia_nim_api_key is not None and bool(self.nvidia_nim_api_key.get_secret_value())

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def resolved_keys_file(self) -> Path:
        return self.keys_file or self.data_dir / "keys"


# The YAML path is chosen at load time; pydantic-settings builds sources per class, so pass it aside.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}


# APPLIANCE_* variables that are not gateway settings: the config file's path, and what Ansible's
# site.env gives docker compose (an admin may have it in the shell that runs `appliance`).
OTHER_VARIABLES = frozenset(
    {"APPLIANCE_CONFIG"}
    | {
        f"APPLIANCE_{name}"
        for name in (
            "BIND_ADDRESS", "HTTPS_PORT", "GPU_DEVICE", "UID", "GID", "HF_CACHE", "VLLM_PLUGINS",
            "CONFIG_FILE", "TLS_DIR", "SECRETS_DIR", "CONFIG_REVISION",
        )
    }
)  # fmt: skip


def setting_variables() -> dict[str, str]:
    """Environment variable -> the setting's name in the YAML file, for every setting."""
    names: dict[str, str] = {}
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        variable = alias.choices[0] if isinstance(alias, AliasChoices) else field_name.upper()
        names[str(variable)] = field_name
    return names


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """'; did you mean X?' with the closest known word, or '' when none is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_variable_names(environ: Mapping[str, str]) -> None:
    """A misspelled APPLIANCE_* variable is an error: ignored, it would leave a wider default in force."""
    known = set(setting_variables()) | OTHER_VARIABLES
    for variable in sorted(environ):
        if variable.upper().startswith("APPLIANCE_") and variable.upper() not in known:
            raise ConfigError(f"unknown environment variable {variable}{did_you_mean(variable, known)}")


def check_model_names(settings: Settings, route_names: Iterable[str], aliases: Mapping[str, str]) -> None:
    """Per-model settings must name a public model: under any other name they would never apply."""
    names = set(route_names)
    for name in settings.models:
        if name in names:
            continue
        if name in aliases:
            raise ConfigError(f"models: '{name}' is an alias; write its public name '{aliases[name]}'")
        raise ConfigError(f"models: unknown model '{name}'{did_you_mean(name, names)}")


def _describe(error: Any, config_file: Path | None) -> str:
    """One line for a validation error; never the value (it may be a key)."""
    loc = [str(p) for p in error["loc"]]
    if len(loc) > 1:  # inside a section (upstreams, routes, models): name it as the file does
        loc[0] = setting_variables().get(loc[0], loc[0])
    where = ".".join(loc) or "configuration"
    if error["type"] != "extra_forbidden":
        return f"invalid setting {where}: {error['msg'].removeprefix('Value error, ')}"
    if loc:  # the file's name for a setting, whichever spelling pydantic reports
        loc[0] = setting_variables().get(loc[0], loc[0])
    in_file = f" in {config_file}" if config_file else ""
    if len(loc) == 3 and loc[0] == "models":
        known: Iterable[str] = ModelOverride.model_fields
        return f"unknown setting '{loc[2]}' under models: {loc[1]}{in_file}{did_you_mean(loc[2], known)}"
    known = setting_variables().values()
    return f"unknown setting '{where}'{in_file}{did_you_mean(where.lower(), known)}"


def load_settings(
    config_file: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read settings; raise ConfigError with one line naming the first bad setting."""
    from appliance.catalog import load_catalog
    from appliance.upstreams.chain import effective_catalog

    environ = os.environ if environ is None else environ
    check_variable_names(environ)
    path = config_file or environ.get("APPLIANCE_CONFIG") or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"APPLIANCE_CONFIG: no such file: {path}")
    _CONFIG_FILE["path"] = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], path)) from None
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read configuration {path}: {type(exc).__name__}: {exc}") from None
    finally:
        _CONFIG_FILE["path"] = None
    catalog = effective_catalog(settings, load_catalog())  # with the file's own routes
    aliases = {alias: r.name for r in catalog.routes for alias in r.aliases}
    check_model_names(settings, (r.name for r in catalog.routes), aliases)
    return settings
