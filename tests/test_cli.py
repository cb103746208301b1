"""The `sia` command's parser (serving itself is tested through `sia serve` elsewhere)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from sia import cli
from sia.access.base import UsageEntry
from sia.access.sqlite_store import SqliteAccessStore
from sia.access.usage import today
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


def test_keys_create_list_revoke_in_the_servers_store(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`sia keys` manages the store `sia serve` reads: the key is printed once, listings
    never show it, a taken name and a bad name exit 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    argv = ["keys", "create", "--name", "team-a", "--rpm", "60", "--budget-per-day", "5"]
    assert cli.main([*argv, "--models", "doubao-seedream-4-0-250828"]) == 0
    created = capsys.readouterr()
    key = created.out.strip()
    assert key.startswith("sia_") and len(key) == 47
    assert "only time it is shown" in created.err

    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "team-a" in listing and "rpm=60" in listing and "budget_per_day=5 CNY" in listing
    assert key not in listing and key[:12] + "…" in listing

    assert cli.main(["keys", "create", "--name", "team-a"]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["keys", "create", "--name", "bad name"]) == 1
    assert "name:" in capsys.readouterr().err

    assert cli.main(["keys", "revoke", "team-a"]) == 0
    assert "revoked key 'team-a'" in capsys.readouterr().err
    assert cli.main(["keys", "list", "--json"]) == 0
    assert '"revoked": "20' in capsys.readouterr().out
    assert cli.main(["keys", "revoke", "nobody"]) == 1
    assert (tmp_path / "data" / "access.db").exists()


def test_usage_prints_what_the_store_holds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`sia usage` sums the ledger per key and model; --json gives one object per row."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))

    async def record() -> None:
        (tmp_path / "data").mkdir()
        store = SqliteAccessStore(tmp_path / "data" / "access.db")
        await store.open()
        entry = UsageEntry("team-a", "m1", today(), 2, 3, 100, 600_000)
        await store.record_usage([entry, entry])
        await store.aclose()

    asyncio.run(record())
    assert cli.main(["usage", "--json"]) == 0
    [row] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert row == {
        "key": "team-a",
        "model": "m1",
        "requests": 4,
        "images": 6,
        "output_tokens": 200,
        "cost": 1.2,
        "currency": "CNY",
    }
    assert cli.main(["usage", "--key", "nobody"]) == 0
    assert "nothing used" in capsys.readouterr().out
