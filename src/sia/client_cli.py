"""`sia generate`, `sia tasks` and `sia health`: the `sia` command as a client of a server.

Everything here talks to a running server through `sia.client`; nothing imports the
server's code. `sia.client` (grpc, protobuf) and `rich` are imported when a command
runs, so `sia generate --help` stays fast.

Exit codes (EXIT_CODES): 0 done, 1 other errors (an image or task that failed, a
download, INTERNAL...), 2 bad arguments (usage or INVALID_ARGUMENT), 3 UNAUTHENTICATED
or PERMISSION_DENIED, 4 NOT_FOUND, 5 RESOURCE_EXHAUSTED, 6 UNAVAILABLE or
DEADLINE_EXCEEDED, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from sia.client import Client, Image, SiaError, Task

#: The sub-commands this module adds.
COMMANDS = ("generate", "tasks", "health")

DEFAULT_SERVER = "localhost:8080"

# The client's default deadlines (sia.client._channel, not imported here: --help stays fast).
_GENERATION_TIMEOUT = 600
_TIMEOUT = 10

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_EXHAUSTED = 5
EXIT_UNAVAILABLE = 6
EXIT_INTERRUPTED = 130

#: Exit code per gRPC status name; a status not listed exits EXIT_OTHER.
EXIT_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "RESOURCE_EXHAUSTED": EXIT_EXHAUSTED,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
}

_EXTENSIONS = {
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}

_FORMATS = {"url": "url", "b64": "b64_json", "b64_json": "b64_json"}

_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class UsageError(Exception):
    """A bad argument found after parsing: one line, exit 2."""


def add_commands(commands: Any) -> None:
    """Add `generate`, `tasks` and `health` to the `sia` command's sub-parsers."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("server")
    group.add_argument(
        "--server", help=f"host:port of the server (default: $SIA_SERVER or {DEFAULT_SERVER})"
    )
    group.add_argument("--api-key", help="the key to send (default: $SIA_API_KEY)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    group.add_argument("--ca", help="trust this CA certificate (PEM; implies --tls)")
    group.add_argument("--cert", help="client certificate (PEM) for mTLS (implies --tls)")
    group.add_argument("--key", help="the client certificate's private key (PEM)")
    parents = [connection]

    generate = commands.add_parser(
        "generate",
        parents=parents,
        help="generate images and save them",
        description="Generate one image, or a group with --count above 1, and save them.",
    )
    generate.add_argument("prompt")
    generate.add_argument("--model", default="", help="model id (default: the server's)")
    generate.add_argument("--size", default="", help="e.g. 2K or 2048x2048")
    generate.add_argument(
        "--image",
        dest="images",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE_OR_URL",
        help="reference image(s): files, http(s) URLs or data URIs",
    )
    generate.add_argument(
        "--count", type=_positive, default=1, help="images in a group (default 1)"
    )
    generate.add_argument(
        "--format", choices=("url", "b64"), default=None, help="how the server sends images"
    )
    generate.add_argument("--seed", type=int, help="seed (one image only)")
    generate.add_argument(
        "-o",
        "--out",
        help="file for one image, or directory (default: the current directory)",
    )
    generate.add_argument(
        "--async",
        dest="submit",
        action="store_true",
        help="submit a task and print its id (follow it with `sia tasks watch ID`)",
    )
    generate.add_argument("--json", action="store_true", help="one JSON object per line")
    _timeout(
        generate,
        f"wait at most this long for the images (default {_GENERATION_TIMEOUT}, longer "
        f"than the server's IMAGE_TIMEOUT; with --async, for the submit: {_TIMEOUT})",
    )
    generate.set_defaults(func=_run(_generate))

    tasks = commands.add_parser("tasks", help="list, inspect, follow and cancel async tasks")
    actions = tasks.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=parents, help="your tasks, newest first")
    listing.add_argument("--status", choices=_STATUSES, help="only tasks in this state")
    listing.add_argument(
        "--limit", type=_count, default=20, help="at most N tasks (0: all; default 20)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per task")
    _timeout(listing, f"deadline of each page's call (default {_TIMEOUT})")
    listing.set_defaults(func=_run(_tasks_list))
    get = actions.add_parser("get", parents=parents, help="a task's state")
    get.add_argument("id")
    get.add_argument("--json", action="store_true", help="the task as JSON")
    _timeout(get, f"deadline of the call (default {_TIMEOUT})")
    get.set_defaults(func=_run(_tasks_get))
    watch = actions.add_parser(
        "watch", parents=parents, help="follow a task to its end, printing each change"
    )
    watch.add_argument("id")
    watch.add_argument("-o", "--out", help="save the final images here (file or directory)")
    watch.add_argument("--json", action="store_true", help="each state as a JSON line")
    _timeout(watch, "stop watching after this long (default: no limit; a watch ends with the task)")
    watch.set_defaults(func=_run(_tasks_watch))
    cancel = actions.add_parser("cancel", parents=parents, help="cancel a queued or running task")
    cancel.add_argument("id")
    _timeout(cancel, f"deadline of the call (default {_TIMEOUT})")
    cancel.set_defaults(func=_run(_tasks_cancel))

    health = commands.add_parser("health", parents=parents, help="whether the server serves")
    health.add_argument("--json", action="store_true", help="the answer as JSON")
    _timeout(health, f"deadline of the call (default {_TIMEOUT})")
    health.set_defaults(func=_run(_health))


def _timeout(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help=f"{text}; exit 6 past it"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


# -- running a command: the client, and errors as one line and an exit code --------------


def _run(command: Callable[[Client, argparse.Namespace], int]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        from sia.client import Client, SiaError, Unauthenticated  # noqa: PLC0415 - fast --help

        server = args.server or os.environ.get("SIA_SERVER") or DEFAULT_SERVER
        try:
            with Client(
                server,
                api_key=args.api_key,
                tls=args.tls,
                ca=args.ca,
                cert=args.cert,
                key=args.key,
            ) as client:
                return command(client, args)
        except Unauthenticated:  # the server's wording is gRPC's; say how this command sends one
            print(f"sia: UNAUTHENTICATED: {_KEY_HINT}", file=sys.stderr)
            return EXIT_AUTH
        except SiaError as exc:
            print(f"sia: {error_line(exc)}", file=sys.stderr)
            return exit_code(exc)
        except UsageError as exc:
            print(f"sia: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            print(f"sia: {exc}", file=sys.stderr)
            return EXIT_OTHER
        except KeyboardInterrupt:
            print("sia: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run


def exit_code(error: SiaError) -> int:
    """The exit code for a client error (EXIT_CODES; 1 for the rest)."""
    return EXIT_CODES.get(error.code.name, EXIT_OTHER) if error.code is not None else EXIT_OTHER


_KEY_HINT = "a valid API key is required: pass --api-key KEY or set SIA_API_KEY"


def error_line(error: SiaError) -> str:
    """One line: the status, then the fields or limits the details name, else the message."""
    status = error.code.name if error.code is not None else "ERROR"
    parts: list[str] = []
    if error.field_violations:
        parts.append("; ".join(f"{v.field}: {v.description}" for v in error.field_violations))
    for quota in error.quota_violations:
        limit = f" = {quota.quota_value}" if quota.quota_value else ""
        parts.append(f"{quota.quota_id}{limit} ({quota.subject}): {quota.description}")
    if not parts:
        parts.append(error.message or status)
    if error.retry_after is not None:
        parts.append(f"retry after {error.retry_after:g}s")
    return f"{status}: {'; '.join(parts)}".replace("\n", " ")


# -- generate ----------------------------------------------------------------------------


def _generate(client: Client, args: argparse.Namespace) -> int:
    if args.seed is not None and args.count > 1:
        raise UsageError("--seed applies to one image only (not with --count above 1)")
    for image in args.images:
        if not image.startswith(("http://", "https://", "data:")) and not Path(image).is_file():
            raise UsageError(f"--image {image}: no such file")
    common: dict[str, Any] = {
        "model": args.model,
        "size": args.size,
        "images": args.images,
        "response_format": _FORMATS[args.format] if args.format else None,
        "timeout": args.timeout,
    }
    if args.submit:
        if args.count > 1:
            task = client.submit_group(args.prompt, max_images=args.count, **common)
        else:
            task = client.submit(args.prompt, seed=args.seed, **common)
        if args.json:
            _emit(task_json(task))
        else:
            print(task.id)
            print(f"sia: submitted; follow it with: sia tasks watch {task.id}", file=sys.stderr)
        return EXIT_OK
    stem = f"sia-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if args.count == 1:
        result = client.generate_image(args.prompt, seed=args.seed, **common)
        saver = _Saver(args, stem, several=len(result.images) > 1, json_lines=args.json)
        for image in result.images:
            saver.save(image)
        return saver.finish(result.model, result.usage.generated_images)
    return _stream(client, args, common, stem)


def _stream(client: Client, args: argparse.Namespace, common: dict[str, Any], stem: str) -> int:
    from sia.client import Completed  # noqa: PLC0415

    saver = _Saver(args, stem, several=True, json_lines=args.json)
    events = client.stream_group(args.prompt, max_images=args.count, **common)
    if args.json:
        model, made = "", 0
        for event in events:
            if isinstance(event, Completed):
                model, made = event.model, event.usage.generated_images
            else:
                saver.save(event)
        return saver.finish(model, made)

    from rich.console import Console  # noqa: PLC0415 - only a group's progress needs it
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=sys.stderr)
    saver.console = console
    model, made = "", 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("generating", total=args.count)
        for event in events:
            if isinstance(event, Completed):
                model, made = event.model, event.usage.generated_images
                # A group may end with fewer images than asked: the bar ends where it is.
                progress.update(bar, total=progress.tasks[0].completed)
            else:
                saver.save(event)
                progress.advance(bar)
    return saver.finish(model, made)


class _Saver:
    """Saves images where --out says, printing a line (or a JSON object) for each."""

    def __init__(
        self, args: argparse.Namespace, stem: str, *, several: bool, json_lines: bool
    ) -> None:
        out: str | None = args.out
        self.context = None
        if args.ca:  # image links are checked against the system's CAs and this one too:
            import ssl  # noqa: PLC0415 - keeps --help fast

            # a private CA's HTTPS port, and S3 presigned or other public HTTPS links alike
            self.context = ssl.create_default_context()
            self.context.load_verify_locations(cafile=args.ca)
        target = Path(out) if out else Path.cwd()
        self.directory = several or out is None or target.is_dir() or out.endswith(os.sep)
        self.target = target
        self.stem = stem
        self.json_lines = json_lines
        self.console: Any = None
        self.saved: list[Path] = []
        self.failed = 0

    def path_for(self, image: Image) -> Path:
        if not self.directory:
            return self.target
        extension = _EXTENSIONS.get(image.content_type.split(";")[0].strip().lower())
        if extension is None:
            suffix = Path(image.url.split("?")[0]).suffix.lstrip(".").lower()
            extension = suffix if suffix else "jpg"
        path = self.target / f"{self.stem}-{image.index}.{extension}"
        n = 1
        while path.exists():
            path = self.target / f"{self.stem}-{image.index}-{n}.{extension}"
            n += 1
        return path

    def save(self, image: Image) -> None:
        record: dict[str, Any] = {
            "index": image.index,
            "size": image.size,
            "content_type": image.content_type,
            "url": image.url,
        }
        if image.error is not None:
            self.failed += 1
            record["error"] = {"code": image.error.code, "message": image.error.message}
            if self.json_lines:
                _emit(record)
            else:
                self._say(f"image {image.index} failed: {image.error.code}: {image.error.message}")
            return
        if self.directory:
            self.target.mkdir(parents=True, exist_ok=True)
        path = image.save(self.path_for(image), context=self.context)
        self.saved.append(path)
        record["path"] = str(path)
        if self.json_lines:
            _emit(record)
        else:
            self._say(f"saved image {image.index} ({image.size}) to {path}")

    def _say(self, line: str) -> None:
        if self.console is not None and sys.stdout.isatty():  # above the progress bar
            self.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def finish(self, model: str, generated: int) -> int:
        if self.json_lines:
            _emit(
                {
                    "summary": True,
                    "model": model,
                    "generated_images": generated,
                    "saved": [str(p) for p in self.saved],
                    "failed": self.failed,
                }
            )
        return EXIT_OTHER if self.failed or not self.saved else EXIT_OK


# -- tasks and health --------------------------------------------------------------------


def _tasks_list(client: Client, args: argparse.Namespace) -> int:
    shown = 0
    page_size = min(args.limit or 100, 100)
    for task in client.iter_tasks(status=args.status, page_size=page_size, timeout=args.timeout):
        if args.json:
            _emit(task_json(task))
        else:
            print(_task_line(task))
        shown += 1
        if args.limit and shown >= args.limit:
            break
    if not shown and not args.json:
        print("no tasks", file=sys.stderr)
    return EXIT_OK


def _tasks_get(client: Client, args: argparse.Namespace) -> int:
    task = client.get_task(args.id, timeout=args.timeout)
    if args.json:
        _emit(task_json(task))
        return EXIT_OK
    print(_task_line(task))
    for image in task.images:
        where = image.url or f"{len(image.data)} bytes inline"
        print(f"  image {image.index}: {image.error.code if image.error else where}")
    return EXIT_OK


def _tasks_watch(client: Client, args: argparse.Namespace) -> int:
    last: Task | None = None
    for state in client.watch_task(args.id, timeout=args.timeout):
        if args.json:
            _emit(task_json(state))
        else:
            print(_task_line(state), flush=True)
        last = state
    assert last is not None, "a watch sends the task's state at once"
    if args.out and last.images:
        saver = _Saver(args, f"sia-{last.id}", several=len(last.images) > 1, json_lines=False)
        for image in last.images:
            saver.save(image)
    return EXIT_OK if last.status.value == "succeeded" else EXIT_OTHER


def _tasks_cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel_task(args.id, timeout=args.timeout)
    print(f"{task.id} {task.status.value}")
    return EXIT_OK


def _health(client: Client, args: argparse.Namespace) -> int:
    health = client.health(timeout=args.timeout)
    if args.json:
        _emit(
            {
                "serving": health.serving,
                "service": health.service,
                "version": health.version,
                "provider": health.provider,
            }
        )
    else:
        state = "serving" if health.serving else "not serving"
        print(f"{state}: {health.service} {health.version} (provider {health.provider})")
    return EXIT_OK if health.serving else EXIT_UNAVAILABLE


def _task_line(task: Task) -> str:
    parts = [task.id, task.status.value]
    if task.images:
        parts.append(f"images={len(task.images)}")
    if task.created_at is not None:
        parts.append(f"created={task.created_at:%Y-%m-%dT%H:%M:%SZ}")
    if task.error is not None:
        parts.append(f"error={task.error.code}: {task.error.message}")
    return " ".join(parts)


def task_json(task: Task) -> dict[str, Any]:
    """A task as plain JSON values (images without their inline bytes)."""

    def stamp(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment is not None else None

    return {
        "id": task.id,
        "status": task.status.value,
        "request_id": task.request_id,
        "created_at": stamp(task.created_at),
        "updated_at": stamp(task.updated_at),
        "finished_at": stamp(task.finished_at),
        "error": ({"code": task.error.code, "message": task.error.message} if task.error else None),
        "images": [_image_json(image) for image in task.images],
    }


def _image_json(image: Image) -> dict[str, Any]:
    return {
        "index": image.index,
        "url": image.url,
        "size": image.size,
        "content_type": image.content_type,
        "error": (
            {"code": image.error.code, "message": image.error.message} if image.error else None
        ),
    }


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)
