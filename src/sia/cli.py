"""The `sia` command: `sia serve` runs the service, `sia keys` and `sia usage` manage
access (`sia.access.cli`), `sia fake-ark` runs a fake upstream.

How the serving process tunes its loop, GC and heap is `sia.runtime`'s business.
"""

from __future__ import annotations

import argparse
import sys

from sia import __version__
from sia.config import load_settings
from sia.errors import ConfigError
from sia.logs import configure_logging, get_logger
from sia.runtime import exec_with_malloc_heap, heap_upkeep, run, tune_gc, tune_malloc

log = get_logger("sia.cli")


def _serve(_: argparse.Namespace) -> int:
    from sia.app import serve  # noqa: PLC0415 - keeps `sia --help` fast

    try:
        settings = load_settings()
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="sia", description="SIA image-generation service")
    parser.add_argument("--version", action="version", version=f"sia {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC and HTTP servers (settings from env)")
    serve.set_defaults(func=_serve)
    from sia.access.cli import add_commands  # noqa: PLC0415 - keeps `sia serve` lean

    add_commands(commands, load_settings)
    # Listed for --help; main() hands its arguments to the fake's own parser.
    commands.add_parser(
        "fake-ark", help="run a fake Volcengine Ark API on loopback (`sia fake-ark --help`)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sia` console script (argv None: this process's command line)."""
    own_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-ark"]:
        from sia.testing import fake_ark  # noqa: PLC0415 - only this command needs it

        fake_ark.main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    if own_command_line and args.command == "serve":
        exec_with_malloc_heap()  # returns only where it does not apply
    code: int = args.func(args)
    return code
