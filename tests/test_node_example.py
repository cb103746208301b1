"""The Node.js example, docs/examples/node/generate.js, against a real running app
(offline provider): images, a group's max_images, and the error details it decodes.

Node runs as an asyncio subprocess: the app serves on the test's own event loop, which
a blocking subprocess.run would stall. Without node or node_modules the tests skip
locally and fail under CI=true (CI must run them, not skip them)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from sia.app import App
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "node" / "generate.js"


def _node() -> str:
    """The node executable; skips (or under CI fails) the test when node or the packages
    the example needs are missing."""
    node = shutil.which("node")
    if node is None:
        missing = "node is not installed"
    elif not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = "node_modules has no @grpc/grpc-js: run `make install-tools`"
    else:
        return node
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI must run the Node example")
    pytest.skip(missing)


async def example(
    app: App, cwd: Path, *argv: str, key: str | None = None
) -> tuple[int, list[str], list[str]]:
    """Run the example against `app` from `cwd`: its exit code, stdout and stderr lines."""
    env = {**os.environ, "SIA_SERVER": f"127.0.0.1:{app.grpc_port}"}
    if key is not None:
        env["SIA_API_KEY"] = key
    process = await asyncio.create_subprocess_exec(
        _node(),
        str(EXAMPLE),
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines(), err.decode().splitlines()


async def test_an_image_with_its_size_and_url(app: App, tmp_path: Path) -> None:
    """GenerateImage prints `index size url`; the script runs from any directory."""
    code, out, err = await example(app, tmp_path, "a red fox", "--size", TEST_SIZE)
    assert (code, err) == (0, [])
    [line] = out
    index, size, url = line.split(" ")
    assert (index, size) == ("0", TEST_SIZE)
    assert url.startswith("http://") and "/images/" in url


async def test_a_group_sends_max_images(app: App, tmp_path: Path) -> None:
    """max_images reaches the server (keepCase: with proto-loader's camelCase default it
    would be dropped, and the offline provider would make 15 images)."""
    code, out, _ = await example(app, tmp_path, "cats", "--size", TEST_SIZE, "--max-images", "2")
    assert code == 0
    assert [line.split(" ")[:2] for line in out] == [["0", TEST_SIZE], ["1", TEST_SIZE]]


async def test_bad_request_names_each_field(app: App, tmp_path: Path) -> None:
    """An invalid request exits 1 with the status, the ErrorInfo reason and one line per
    BadRequest field violation, decoded from grpc-status-details-bin."""
    code, out, err = await example(app, tmp_path, "", "--size", "99x99", "--max-images", "99")
    assert (code, out) == (1, [])
    assert err[0].startswith("INVALID_ARGUMENT: ")
    assert err[1] == "  reason INVALID_ARGUMENT (sia.image.v1)"
    fields = [line.strip().split(":")[0] for line in err[2:]]
    assert fields == ["prompt", "size", "max_images"]


async def test_a_key_and_its_quota(app: App, tmp_path: Path) -> None:
    """SIA_API_KEY is sent as a bearer token; without one the call is UNAUTHENTICATED, and
    over the key's limit QuotaFailure and RetryInfo are printed."""
    key = await app_key(app, "node", requests_per_minute=1)
    code, _, err = await example(app, tmp_path, "a fox", "--size", TEST_SIZE)
    assert code == 1
    assert err[0].startswith("UNAUTHENTICATED: ")
    code, out, _ = await example(app, tmp_path, "a fox", "--size", TEST_SIZE, key=key)
    assert code == 0
    assert len(out) == 1
    code, _, err = await example(app, tmp_path, "a fox", "--size", TEST_SIZE, key=key)
    assert code == 1
    assert err[0].startswith("RESOURCE_EXHAUSTED: ")
    assert "  quota key:node requests_per_minute: 1 requests a minute" in err
    assert any(line.startswith("  retry in ") for line in err)
    assert not any(key in line for line in out + err)
