"""Tests for settings: defaults, environment, .env, validation and secrecy."""

from __future__ import annotations

from pathlib import Path

import pytest

from sia.config import Settings, load_settings, without_settings
from sia.errors import ConfigError


@pytest.fixture(autouse=True)
def _empty_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run each test in an empty directory, so no developer's .env is read."""
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    """With no environment the documented defaults apply and the provider is offline."""
    s = load_settings({})
    assert (s.app_name, s.app_version, s.app_environment) == (
        "sia-image-service",
        "1.0.0",
        "development",
    )
    assert (s.grpc_port, s.http_port, s.log_level, s.log_format) == (8080, 9090, "info", "json")
    assert s.image_base_url == "https://ark.cn-beijing.volces.com"
    assert (s.image_model, s.image_default_size) == ("doubao-seedream-4-0-250828", "2K")
    assert (s.image_timeout, s.image_max_retries) == (300.0, 3)
    assert s.image_api_key is None
    assert s.provider == "offline"
    assert s.grpc_max_message_bytes == 64 * 1024 * 1024


def test_environment_overrides() -> None:
    """Variables are read case-insensitively in value where it makes sense."""
    s = load_settings({"GRPC_PORT": "50051", "LOG_LEVEL": "DEBUG", "IMAGE_API_KEY": "sk-live-123"})
    assert (s.grpc_port, s.log_level, s.provider) == (50051, "debug", "ark")


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no mapping given, load_settings reads this process's environment."""
    monkeypatch.setenv("GRPC_PORT", "50052")
    assert load_settings().grpc_port == 50052


def test_dotenv_file(tmp_path: Path) -> None:
    """A .env file in the working directory is read; the environment wins over it."""
    (tmp_path / ".env").write_text("HTTP_PORT=9191\nAPP_NAME=from-dotenv\n")
    s = load_settings({"APP_NAME": "from-env"})
    assert (s.http_port, s.app_name) == (9191, "from-env")


def test_without_settings_keeps_only_foreign_variables() -> None:
    """A child's environment keeps PATH and the like and loses every SIA setting."""
    environ = {"PATH": "/bin", "GRPC_PORT": "1", "image_api_key": "k", "REDIS_URL": "redis://x"}
    assert without_settings(environ) == {"PATH": "/bin"}


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("GRPC_PORT", "eighty", "GRPC_PORT: Input should be a valid integer"),
        ("HTTP_PORT", "70000", "HTTP_PORT: Input should be less than or equal to 65535"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL: Input should be"),
        ("IMAGE_TIMEOUT", "0", "IMAGE_TIMEOUT: Input should be greater than 0"),
        ("IMAGE_BASE_URL", "ark.example.com", "IMAGE_BASE_URL: must start with http"),
        ("TASK_WORKERS", "0", "TASK_WORKERS: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    """A bad value raises ConfigError with one line naming the variable."""
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert fragment in info.value.message
    assert "\n" not in info.value.message


def test_production_requires_key() -> None:
    """APP_ENVIRONMENT=production without IMAGE_API_KEY is a start-up error."""
    with pytest.raises(ConfigError, match="IMAGE_API_KEY: required when APP_ENVIRONMENT"):
        load_settings({"APP_ENVIRONMENT": "production"})


def test_explicit_provider_requires_key() -> None:
    """IMAGE_PROVIDER=ark without a key is a start-up error."""
    with pytest.raises(ConfigError, match="IMAGE_API_KEY: required when IMAGE_PROVIDER=ark"):
        load_settings({"IMAGE_PROVIDER": "ark"})


def test_api_key_never_shown() -> None:
    """The API key appears in neither repr, str, nor a validation error."""
    s = load_settings({"IMAGE_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in str(s)
    assert s.image_api_key is not None
    assert s.image_api_key.get_secret_value() == "sk-very-secret"
    with pytest.raises(ConfigError) as info:
        load_settings({"IMAGE_API_KEY": "sk-very-secret", "GRPC_PORT": "sk-very-secret"})
    assert "sk-very-secret" not in info.value.message


def test_env_example_lists_every_setting() -> None:
    """.env.example documents every setting with its default."""
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    names = {line.split("=")[0].lstrip("# ") for line in example.splitlines() if "=" in line}
    assert {name.upper() for name in Settings.model_fields} <= names


def test_openai_provider_defaults() -> None:
    """IMAGE_PROVIDER=openai brings its own base URL, model and size unless they are set."""
    environ = {"IMAGE_PROVIDER": "openai", "IMAGE_API_KEY": "sk-x"}
    s = load_settings(environ)
    assert (s.image_base_url, s.image_model, s.image_default_size) == (
        "https://api.openai.com",
        "gpt-image-1",
        "1024x1024",
    )
    assert load_settings({**environ, "IMAGE_MODEL": "dall-e-3"}).image_model == "dall-e-3"
