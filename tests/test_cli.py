"""The `sia` command's parser (serving itself is tested through `sia serve` elsewhere)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sia import cli
from tests.helpers import LogConfig


def test_parser_knows_both_commands() -> None:
    """`serve` and `fake-ark` are both sub-commands."""
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).command == "serve"
    assert parser.parse_args(["fake-ark"]).command == "fake-ark"  # main() hands on its arguments


def test_bad_configuration_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad variable makes `sia serve` print one line naming it and exit 2."""
    monkeypatch.setenv("GRPC_PORT", "eighty")
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "sia: configuration error: GRPC_PORT: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


def test_a_port_in_use_exits_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    log_config: LogConfig,
) -> None:
    """A gRPC port another process holds stops start-up with one line naming it, no traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "tune_gc", lambda: None)  # keep the suite's GC as it is
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name, value in {
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": str(port),
            "HTTP_PORT": "0",
        }.items():
            monkeypatch.setenv(name, value)
        assert cli.main(["serve"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sia: cannot start: GRPC_PORT: cannot listen on 127.0.0.1:{port} (in use, or not allowed)"
    )
