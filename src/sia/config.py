"""Settings: read once at start-up from the environment and an optional `.env`.

`load_settings()` is the one place that reads `os.environ`; everything else
receives a `Settings` instance, and tests pass their own mapping
(`load_settings(environ={...})`). A bad value is reported as one line naming
the variable. The variables and their defaults are listed in
docs/configuration.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from sia.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(ge=0)]


#: Defaults that differ by provider, applied where the variable is not set.
PROVIDER_DEFAULTS: dict[str, dict[str, str]] = {
    "openai": {
        "image_base_url": "https://api.openai.com",
        "image_model": "gpt-image-1",
        "image_default_size": "1024x1024",
        "price_currency": "USD",
    },
}


class Settings(BaseSettings):
    """Every setting of the service; field `grpc_port` is variable GRPC_PORT."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        case_sensitive=False,
    )

    app_name: str = "sia-image-service"
    app_version: str = "1.0.0"
    app_environment: Literal["development", "staging", "production", "test"] = "development"

    grpc_host: str = "0.0.0.0"  # noqa: S104 - a server listens on all interfaces by default
    grpc_port: Port = 8080
    grpc_max_message_mb: Annotated[int, Field(ge=4, le=2047)] = 64
    grpc_max_pending_requests: Annotated[int, Field(ge=1)] = 3000
    http_host: str = "0.0.0.0"  # noqa: S104
    http_port: Port = 9090
    public_url: str = ""
    playground_enabled: bool = True  # the web playground at / (docs/playground.md)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    image_provider: Literal["auto", "offline", "ark", "openai"] = "auto"
    image_api_key: SecretStr | None = None
    image_base_url: str = "https://ark.cn-beijing.volces.com"
    image_model: str = "doubao-seedream-4-0-250828"
    image_default_size: str = "2K"
    image_timeout: Annotated[float, Field(gt=0)] = 300.0
    image_max_retries: Annotated[int, Field(ge=0, le=10)] = 3
    image_max_connections: Annotated[int, Field(ge=1)] = 4096
    provider_recheck_interval: Annotated[float, Field(gt=0)] = 60.0

    offline_latency: Seconds = 0.0
    offline_image_format: Literal["jpeg", "png"] = "jpeg"

    data_dir: Path = Path("data")
    task_backend: Literal["sqlite", "redis"] = "sqlite"
    task_workers: Annotated[int, Field(ge=1, le=1024)] = 16
    task_queue_limit: Annotated[int, Field(ge=1)] = 1000
    task_retention: Annotated[float, Field(gt=0)] = 86400.0
    task_max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    task_heartbeat: Annotated[float, Field(ge=1)] = 20.0
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    redis_queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "sia"
    redis_require_persistence: bool = True  # refuse, in production, a Redis that persists nothing
    shutdown_grace: Seconds = 30.0

    blob_store: Literal["local", "s3"] = "local"
    store_results: bool = False
    s3_bucket: str = ""
    s3_prefix: str = "sia/"
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr | None = None
    s3_public_url: str = ""

    # Access control (docs/access-control.md).
    auth_mode: Literal["auto", "keys", "none"] = "auto"
    keys_refresh_interval: Annotated[float, Field(gt=0, le=10)] = 5.0
    metrics_token: SecretStr | None = None
    # NoDecode: the validator below parses the JSON, so an empty value in .env is {} too.
    model_prices: Annotated[dict[str, Annotated[float, Field(ge=0)]], NoDecode] = {}
    price_currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "CNY"
    upstream_images_per_minute: Annotated[int, Field(ge=0)] = 0  # 0: no account-wide limit
    limits_storage: Literal["auto", "memory", "redis"] = "auto"
    image_url_ttl: Annotated[float, Field(ge=0)] = 0.0  # 0: TASK_RETENTION
    image_url_secret: SecretStr | None = None
    grpc_tls_cert_file: Path | None = None
    grpc_tls_key_file: Path | None = None
    grpc_tls_client_ca_file: Path | None = None
    http_tls_cert_file: Path | None = None
    http_tls_key_file: Path | None = None
    tls_reload_interval: Annotated[float, Field(gt=0)] = 30.0

    # Webhooks (docs/clients.md#webhooks).
    webhook_secret: SecretStr | None = None  # whsec_<base64>; webhooks are refused without it
    webhook_allow_private: bool = False  # loopback, private, link-local and metadata addresses
    webhook_retry_period: Annotated[float, Field(gt=0)] = 86400.0
    webhook_timeout: Annotated[float, Field(gt=0, le=60)] = 10.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then `.env`: the environment arrives through `from_env`."""
        return (init_settings, dotenv_settings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], env_file: str | Path | None = ".env") -> Settings:
        """Settings from `environ` (which wins) and `env_file`; ValidationError when bad."""
        names = set(cls.env_names())
        values: dict[str, Any] = {
            key.lower(): value for key, value in environ.items() if key.lower() in names
        }
        return cls(_env_file=env_file, **values)  # type: ignore[call-arg]  # pydantic-settings init arg

    @classmethod
    def env_names(cls) -> list[str]:
        """The setting names, lower case; variable NAME is field `name`."""
        return list(cls.model_fields)

    @field_validator(
        "log_level",
        "log_format",
        "app_environment",
        "image_provider",
        "task_backend",
        "blob_store",
        "auth_mode",
        "limits_storage",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "image_api_key",
        "s3_secret_access_key",
        "metrics_token",
        "image_url_secret",
        "webhook_secret",
        "grpc_tls_cert_file",
        "grpc_tls_key_file",
        "grpc_tls_client_ca_file",
        "http_tls_cert_file",
        "http_tls_key_file",
        mode="before",
    )
    @classmethod
    def _blank_key_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_prices", mode="before")
    @classmethod
    def _json_prices(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f'not JSON ({exc.msg}); example: {{"model-id": 0.2}}') from None
        return value

    @field_validator("public_url", "image_base_url", "s3_endpoint_url", "s3_public_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_provider(self) -> Settings:
        if self.app_environment == "production" and self.image_api_key is None:
            if self.image_provider != "offline":
                raise ValueError(
                    "IMAGE_API_KEY: required when APP_ENVIRONMENT=production "
                    "(set IMAGE_PROVIDER=offline to run without a provider)"
                )
        elif self.image_provider in ("ark", "openai") and self.image_api_key is None:
            raise ValueError(f"IMAGE_API_KEY: required when IMAGE_PROVIDER={self.image_provider}")
        if self.blob_store == "s3" and not self.s3_bucket:
            raise ValueError("S3_BUCKET: required when BLOB_STORE=s3")
        for cert, key in (
            ("grpc_tls_cert_file", "grpc_tls_key_file"),
            ("http_tls_cert_file", "http_tls_key_file"),
        ):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"{cert.upper()} and {key.upper()}: set both or neither")
        if self.grpc_tls_client_ca_file is not None and self.grpc_tls_cert_file is None:
            raise ValueError(
                "GRPC_TLS_CLIENT_CA_FILE: needs GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE"
            )
        for name, value in PROVIDER_DEFAULTS.get(self.provider, {}).items():
            if name not in self.model_fields_set:
                object.__setattr__(self, name, value)  # frozen model: set during validation only
        return self

    @property
    def provider(self) -> Literal["offline", "ark", "openai"]:
        """The provider to use: IMAGE_PROVIDER, or for `auto` ark with a key, offline without."""
        if self.image_provider != "auto":
            return self.image_provider
        return "ark" if self.image_api_key is not None else "offline"

    @property
    def limits_backend(self) -> Literal["memory", "redis"]:
        """Where rate limits count: LIMITS_STORAGE, or for `auto` Redis with the redis task
        backend (limits then hold across replicas) and memory otherwise."""
        if self.limits_storage != "auto":
            return self.limits_storage
        return "redis" if self.task_backend == "redis" else "memory"

    @property
    def image_link_ttl(self) -> float:
        """Seconds an HTTP-port image link stays valid: IMAGE_URL_TTL, else TASK_RETENTION."""
        return self.image_url_ttl or self.task_retention

    @property
    def grpc_max_message_bytes(self) -> int:
        """GRPC_MAX_MESSAGE_MB in bytes."""
        return self.grpc_max_message_mb * 1024 * 1024


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Read the settings from `environ` (default: this process's), raising ConfigError.

    The error has one line per bad variable.
    """
    try:
        return Settings.from_env(os.environ if environ is None else environ, env_file)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less every variable SIA reads: a clean start for a child `sia serve`."""
    names = set(Settings.env_names())
    return {key: value for key, value in environ.items() if key.lower() not in names}


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        name = "_".join(str(part) for part in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}: {message}" if name else message)
    return "; ".join(problems)
