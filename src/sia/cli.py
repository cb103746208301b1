"""The `sia` command: `sia serve` runs the service, `sia keys` and `sia usage` manage
access (`sia.access.cli`), `sia fake-ark` runs a fake upstream, and `sia generate`,
`sia tasks` and `sia health` are a client of a running server (`sia.client_cli`).

How the serving process tunes its loop, GC and heap is `sia.runtime`'s business. The
server's modules (settings, logging, runtime, access) are imported only by the commands
that need them, so the client commands start fast (`sia generate --help`).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from sia import __version__
from sia.client_cli import COMMANDS as CLIENT_COMMANDS
from sia.client_cli import add_commands as add_client_commands

if TYPE_CHECKING:
    from sia.config import Settings


def tune_gc() -> None:
    """`sia.runtime.tune_gc`, imported when serving (tests replace this)."""
    from sia.runtime import tune_gc as tune  # noqa: PLC0415 - server-only

    tune()


def _load_settings() -> Settings:
    from sia.config import load_settings  # noqa: PLC0415 - server-only

    return load_settings()


def _serve(_: argparse.Namespace) -> int:
    # Server-only imports: keeps `sia --help` and the client commands fast.
    from sia.app import serve  # noqa: PLC0415
    from sia.errors import ConfigError  # noqa: PLC0415
    from sia.logs import configure_logging, get_logger  # noqa: PLC0415
    from sia.runtime import heap_upkeep, run, tune_malloc  # noqa: PLC0415

    log = get_logger("sia.cli")
    try:
        settings = _load_settings()
    except ConfigError as exc:
        print(f"sia: configuration error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    tune_gc()
    tune_malloc()
    if settings.provider == "offline":
        log.warning(
            "offline_provider",
            message="no IMAGE_API_KEY set: images are rendered locally by the offline provider",
        )
    try:
        run(heap_upkeep(serve(settings)))
    except ConfigError as exc:
        log.error("startup_failed", error=exc.message)
        print(f"sia: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        print(f"sia: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser(*, server_commands: bool = True) -> argparse.ArgumentParser:
    """The argument parser with its sub-commands; without `server_commands`, `keys` and
    `usage` are left out (their parsers import the server's access code)."""
    parser = argparse.ArgumentParser(prog="sia", description="SIA image-generation service")
    parser.add_argument("--version", action="version", version=f"sia {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC and HTTP servers (settings from env)")
    serve.set_defaults(func=_serve)
    if server_commands:
        from sia.access.cli import add_commands  # noqa: PLC0415 - keeps the client lean

        add_commands(commands, _load_settings)
    # Listed for --help; main() hands its arguments to the fake's own parser.
    commands.add_parser(
        "fake-ark", help="run a fake Volcengine Ark API on loopback (`sia fake-ark --help`)"
    )
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sia` console script (argv None: this process's command line)."""
    own_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-ark"]:
        from sia.testing import fake_ark  # noqa: PLC0415 - only this command needs it

        fake_ark.main(argv[1:])
        return 0
    client_command = bool(argv) and argv[0] in CLIENT_COMMANDS
    args = build_parser(server_commands=not client_command).parse_args(argv)
    if own_command_line and args.command == "serve":
        from sia.runtime import exec_with_malloc_heap  # noqa: PLC0415 - server-only

        exec_with_malloc_heap()  # returns only where it does not apply
    code: int = args.func(args)
    return code
