"""`sia generate`, `sia tasks` and `sia health` against a real running app (offline
provider). The blocking client runs in a thread: the app shares the test's loop."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage

from sia import cli, client_cli
from sia import client as sia_client
from sia.app import App
from sia.client._channel import GENERATION_TIMEOUT, TIMEOUT
from sia.client_cli import EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE, MakeSettings
from tests.test_tls import TestCA

SERVER_MODULES = ("sia.config", "sia.app", "sia.runtime", "sia.logs", "sia.access.cli")
SERVER_PACKAGES = ("pydantic", "aiohttp", "PIL")


@pytest.fixture(autouse=True)
def _no_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIA_API_KEY", raising=False)
    monkeypatch.delenv("SIA_SERVER", raising=False)


async def sia(app: App, *argv: str) -> int:
    """Run `sia ARGV --server <app>` in a thread; its exit code."""
    command, *rest = argv
    if command == "tasks":
        command, action, *rest = argv
        command = f"{command} {action}"
    full = [*command.split(), "--server", f"127.0.0.1:{app.grpc_port}", *rest]
    return await asyncio.to_thread(cli.main, full)


def _ours(out: str) -> list[str]:
    """The command's lines of captured stdout, without the app's JSON log lines (every
    log line, access lines included, names its `logger`; the command's JSON never does)."""
    return [line for line in out.splitlines() if not _is_log_line(line)]


def _is_log_line(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return "logger" in json.loads(line)
    except ValueError:
        return False


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern))


def _jpeg_size(path: Path) -> str:
    with PILImage.open(path) as picture:
        assert picture.format == "JPEG"
        return f"{picture.width}x{picture.height}"


async def test_generate_saves_a_jpeg_of_the_size_asked(
    app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One image goes to the file --out names, and the output says where."""
    out = tmp_path / "fox.jpg"
    assert await sia(app, "generate", "a red fox", "--size", TEST_SIZE, "-o", str(out)) == 0
    assert _jpeg_size(out) == TEST_SIZE
    assert str(out) in capsys.readouterr().out


async def test_generate_names_files_in_a_directory(
    app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out the image lands in the current directory as sia-<time>-<index>.jpg;
    b64 works as url does."""
    monkeypatch.chdir(tmp_path)
    assert await sia(app, "generate", "a fox", "--size", TEST_SIZE, "--format", "b64") == 0
    [path] = _files(tmp_path, "sia-*-0.jpg")
    assert _jpeg_size(path) == TEST_SIZE
    assert path.name in capsys.readouterr().out


async def test_a_group_streams_three_files_with_progress(
    app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--count 3 streams the group: three files, a line per image, the progress bar."""
    out = tmp_path / "out"
    argv = ["generate", "a comic strip", "--size", TEST_SIZE, "--count", "3", "-o", str(out)]
    assert await sia(app, *argv) == 0
    files = sorted(out.iterdir())
    assert [p.name.rsplit("-", 1)[1] for p in files] == ["0.jpg", "1.jpg", "2.jpg"]
    assert all(_jpeg_size(p) == TEST_SIZE for p in files)
    captured = capsys.readouterr()
    saved = [line for line in _ours(captured.out) if line.startswith("saved image")]
    assert len(saved) == 3 and all(str(out) in line for line in saved)
    assert "3/3" in captured.err  # rich's progress, finished


async def test_generate_json_is_one_object_per_image_then_a_summary(
    app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "a strip", "--size", TEST_SIZE, "--count", "2", "--json"]
    assert await sia(app, *argv, "-o", str(tmp_path)) == 0
    captured = capsys.readouterr()
    *images, summary = [json.loads(line) for line in _ours(captured.out)]
    assert [image["index"] for image in images] == [0, 1]
    assert all(_jpeg_size(Path(image["path"])) == TEST_SIZE for image in images)
    assert summary["summary"] and summary["generated_images"] == 2 and summary["failed"] == 0
    assert "/2" not in captured.err  # no progress with --json


async def test_async_then_watch_follows_to_succeeded(
    app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--async prints the task id; `tasks watch` prints each state to SUCCEEDED and
    saves only with --out; `tasks get --json` and `tasks list --json` show it."""
    assert await sia(app, "generate", "a lighthouse", "--size", TEST_SIZE, "--async") == 0
    [task_id] = _ours(capsys.readouterr().out)
    assert task_id.startswith("task_")

    assert await sia(app, "tasks", "watch", task_id, "-o", str(tmp_path / "l.jpg")) == 0
    lines = _ours(capsys.readouterr().out)
    states = [line.split()[1] for line in lines if line.startswith(task_id)]
    assert states[-1] == "succeeded"
    assert _jpeg_size(tmp_path / "l.jpg") == TEST_SIZE

    assert await sia(app, "tasks", "get", task_id, "--json") == 0
    [task] = [json.loads(line) for line in _ours(capsys.readouterr().out)]
    assert task["status"] == "succeeded" and len(task["images"]) == 1

    assert await sia(app, "tasks", "list", "--json") == 0
    listed = [json.loads(line) for line in _ours(capsys.readouterr().out)]
    assert [t["id"] for t in listed] == [task_id]
    assert await sia(app, "tasks", "list", "--status", "failed", "--json") == 0
    assert _ours(capsys.readouterr().out) == []


async def test_cancel_a_finished_task_and_get_an_unknown_one(
    app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished task cannot be cancelled (1, FAILED_PRECONDITION); an unknown id is 4."""
    assert await sia(app, "generate", "a fox", "--size", TEST_SIZE, "--async") == 0
    [task_id] = _ours(capsys.readouterr().out)
    assert await sia(app, "tasks", "watch", task_id) == 0
    capsys.readouterr()
    assert await sia(app, "tasks", "cancel", task_id) == 1
    assert capsys.readouterr().err.startswith("sia: FAILED_PRECONDITION: ")
    assert await sia(app, "tasks", "get", "task_missing") == 4
    assert capsys.readouterr().err.startswith("sia: NOT_FOUND: ")


async def test_a_bad_size_is_one_line_naming_the_field(
    app: App, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = await sia(app, "generate", "a fox", "--size", "10x10", "-o", str(out))
    assert code == EXIT_USAGE
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("sia: INVALID_ARGUMENT: size: ")
    assert not out.exists()


async def test_a_wrong_key_exits_with_the_auth_code(
    app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    await app_key(app, "team-a")
    code = await sia(app, "generate", "a fox", "--api-key", "sia_" + "x" * 43)
    assert code == EXIT_AUTH
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("sia: UNAUTHENTICATED: ")
    assert line.endswith("pass --api-key KEY or set SIA_API_KEY")  # how this command sends one


async def test_health(app: App, capsys: pytest.CaptureFixture[str]) -> None:
    assert await sia(app, "health") == 0
    [line] = _ours(capsys.readouterr().out)
    assert line.startswith("serving: ")
    assert await sia(app, "health", "--json") == 0
    [line] = _ours(capsys.readouterr().out)
    assert json.loads(line)["serving"] is True


async def test_timeout_is_the_deadline_of_a_generation_and_a_watch(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--timeout cuts a generation or a watch short (DEADLINE_EXCEEDED, exit 6); without
    it a watch has no deadline, even from a client whose own deadlines are short."""
    async with App(make_settings(offline_latency=1.5)) as slow:
        argv = ["generate", "a fox", "--size", TEST_SIZE, "--timeout", "0.3"]
        assert await sia(slow, *argv) == EXIT_UNAVAILABLE
        assert capsys.readouterr().err.startswith("sia: DEADLINE_EXCEEDED: ")

        assert await sia(slow, "generate", "a fox", "--size", TEST_SIZE, "--async") == 0
        [task_id] = _ours(capsys.readouterr().out)
        assert await sia(slow, "tasks", "watch", task_id, "--timeout", "0.3") == EXIT_UNAVAILABLE
        assert capsys.readouterr().err.startswith("sia: DEADLINE_EXCEEDED: ")

        # A fresh task, 1.5 s from its end: the watch starts long before that, and lasts
        # past the short deadlines (asserted: a task already over would prove nothing).
        assert await sia(slow, "generate", "a hare", "--size", TEST_SIZE, "--async") == 0
        [task_id] = _ours(capsys.readouterr().out)
        short = functools.partial(sia_client.Client, timeout=0.3, generation_timeout=0.3)
        monkeypatch.setattr(sia_client, "Client", short)
        started = time.monotonic()
        assert await sia(slow, "tasks", "watch", task_id) == 0
        watched = time.monotonic() - started
        states = [line.split()[1] for line in _ours(capsys.readouterr().out)]
        assert states[0] in {"queued", "running"}, "the task ended before the watch began"
        assert states[-1] == "succeeded"
        assert watched > 0.3


def test_ca_is_trusted_besides_the_system_s_cas(tmp_path: Path) -> None:
    """--ca adds a CA to the system's for image links: S3 presigned or other public HTTPS
    links still verify, and so do those of a server with a private CA."""
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if not system:
        pytest.skip("no system CAs in a CA file here (cert_store_stats counts no CA dir)")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(TestCA("SIA CLI test CA").pem)
    args = argparse.Namespace(out=str(tmp_path), ca=str(ca_file))
    context = client_cli._Saver(args, "stem", several=False, json_lines=False).context
    assert context is not None
    assert context.cert_store_stats()["x509_ca"] == system + 1
    subjects = [dict(name[0] for name in cert["subject"]) for cert in context.get_ca_certs()]
    assert {"commonName": "SIA CLI test CA"} in subjects


def test_the_help_names_the_client_s_default_deadlines() -> None:
    """The CLI's help states the defaults without importing the client (--help is fast)."""
    assert (client_cli._GENERATION_TIMEOUT, client_cli._TIMEOUT) == (GENERATION_TIMEOUT, TIMEOUT)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_timeout_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["tasks", "watch", "task_x", "--timeout", value])
    assert info.value.code == EXIT_USAGE
    assert "--timeout" in capsys.readouterr().err


def test_an_unreachable_server_exits_6(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens on port 1: UNAVAILABLE, after the client's retries."""
    assert cli.main(["health", "--server", "127.0.0.1:1"]) == 6
    assert capsys.readouterr().err.startswith("sia: UNAVAILABLE: ")


def test_seed_with_a_group_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "x", "--count", "2", "--seed", "1"]) == EXIT_USAGE
    assert "--seed" in capsys.readouterr().err


def test_generate_help_imports_none_of_the_server() -> None:
    """`sia generate --help` loads neither the server's modules nor its dependencies."""
    script = (
        "import sys\n"
        "from sia.cli import main\n"
        "try:\n"
        "    main(['generate', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.splitlines())
    assert "usage: sia generate" in done.stdout
    assert not loaded & set(SERVER_MODULES)
    assert not {m for m in loaded if m.split(".")[0] in SERVER_PACKAGES}
