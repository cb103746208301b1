"""The `sia` command's parser (serving itself is tested through `sia serve` elsewhere)."""

from __future__ import annotations

import pytest

from sia import cli


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
