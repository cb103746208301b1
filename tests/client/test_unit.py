"""The client without a server: its channel config, request building, repr and imports."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

from sia.api.image.v1 import image_service_pb2 as pb
from sia.client import (
    IDEMPOTENT_METHODS,
    AsyncClient,
    Client,
    DownloadError,
    Image,
    ImageFailure,
    TaskStatus,
    image_reference,
    service_config,
)
from sia.client._channel import channel_options
from sia.client._requests import generate_request, group_request, list_request

KEY = "sia_" + "k" * 43


def _png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (4, 4), "red").save(out, format="PNG")
    return out.getvalue()


def test_the_retry_policy_names_only_the_idempotent_methods() -> None:
    """UNAVAILABLE is retried on reads and cancel, never on billed generations or streams."""
    [method_config] = json.loads(service_config())["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {("image.v1.ImageService", m) for m in IDEMPOTENT_METHODS}
    assert set(IDEMPOTENT_METHODS) == {
        "GetImageTask",
        "ListImageTasks",
        "GetUsage",
        "HealthCheck",
        "CancelImageTask",
    }
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    options = dict(channel_options())
    assert options["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert options["grpc.keepalive_time_ms"] == 30_000


async def test_the_key_is_never_in_repr() -> None:
    """repr says a key is set, never what it is; the environment supplies a missing one."""
    with Client("localhost:1", api_key=KEY) as sync:
        assert KEY not in repr(sync)
        assert "api_key=<set>" in repr(sync)
        assert KEY not in repr(sync._settings)
    async with AsyncClient("localhost:1", environ={"SIA_API_KEY": KEY}) as aio:
        assert KEY not in repr(aio)
        assert aio._settings.metadata == (("authorization", f"Bearer {KEY}"),)
    async with AsyncClient("localhost:1", api_key="", environ={"SIA_API_KEY": KEY}) as none:
        assert none._settings.metadata == ()
        assert "api_key" not in repr(none)


def test_files_and_bytes_become_data_uris_with_their_type(tmp_path: Path) -> None:
    """URLs pass as they are; a path or bytes become data:image/<type>;base64 URIs."""
    png = _png()
    path = tmp_path / "ref.bin"
    path.write_bytes(png)
    expected = "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_reference(png) == expected
    assert image_reference(path) == expected
    assert image_reference(str(path)) == expected
    assert image_reference("https://example.com/a.jpg") == "https://example.com/a.jpg"
    assert image_reference(b"\xff\xd8\xff\xe0rest").startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="not a PNG"):
        image_reference(b"hello")


def test_requests_carry_only_the_fields_given() -> None:
    """Unset optional fields stay unset, so the server's defaults apply."""
    plain = generate_request("a fox")
    assert not plain.HasField("seed") and not plain.HasField("watermark")
    full = generate_request(
        "a fox", seed=7, guidance_scale=2.5, response_format="b64_json", watermark=False
    )
    assert (full.seed, full.guidance_scale, full.watermark) == (7, 2.5, False)
    assert full.response_format == pb.RESPONSE_FORMAT_B64_JSON
    group = group_request("a strip", max_images=3, response_format="url")
    assert (group.max_images, group.response_format) == (3, pb.RESPONSE_FORMAT_URL)
    assert list_request("queued", 5, "").status == pb.TASK_STATUS_QUEUED
    assert TaskStatus.from_proto(pb.TASK_STATUS_CANCELLED) is TaskStatus.CANCELLED


def test_a_failed_image_cannot_be_saved(tmp_path: Path) -> None:
    failed = Image(index=1, error=ImageFailure("OutputImageSensitiveContentDetected", "no"))
    with pytest.raises(DownloadError, match="Sensitive"):
        failed.save(tmp_path / "x.jpg")
    with pytest.raises(DownloadError, match="neither"):
        Image(index=0).save(tmp_path / "y.jpg")


def test_the_client_imports_none_of_the_server() -> None:
    """`import sia.client` loads no settings, app, service, pydantic, aiohttp or Pillow."""
    code = (
        "import sia.client, sys; "
        "bad = [m for m in sys.modules if m.startswith(('sia.config', 'sia.app', "
        "'sia.service', 'pydantic', 'aiohttp', 'PIL'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
