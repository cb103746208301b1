"""Tests that the committed generated code matches the proto and that the proto lints."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "src" / "sia" / "api" / "image" / "v1"


def load_generator() -> object:
    """scripts/generate_proto.py as a module (the same code `make proto` runs)."""
    spec = importlib.util.spec_from_file_location(
        "generate_proto", ROOT / "scripts" / "generate_proto.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerating from proto/ gives byte-identical files to the committed ones."""
    load_generator().generate(tmp_path)  # type: ignore[attr-defined]
    fresh = tmp_path / "sia" / "api" / "image" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == [
        "image_service_pb2.py",
        "image_service_pb2.pyi",
        "image_service_pb2_grpc.py",
        "image_service_pb2_grpc.pyi",
    ]
    stale = [n for n in names if (fresh / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, f"{stale} are stale against proto/: run `make proto` and commit"


def test_buf_lint() -> None:
    """`buf lint` passes on proto/ with buf.yaml (the npm package @bufbuild/buf)."""
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail("buf is not installed: run `make install-dev` (npm ci)")
    result = subprocess.run(
        [str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_of_the_contract() -> None:
    """The service has exactly the RPCs clients rely on, with their message types."""
    from sia.api.image.v1 import image_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ImageService"]
    assert service.full_name == "image.v1.ImageService"
    rpcs = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert rpcs == {
        "GenerateImage": ("GenerateImageRequest", "GenerateImageResponse"),
        "GenerateImageAsync": ("GenerateImageRequest", "GenerateImageAsyncResponse"),
        "GetImageTask": ("GetImageTaskRequest", "GetImageTaskResponse"),
        "GenerateSequentialImages": ("GenerateSequentialImagesRequest", "GenerateImageResponse"),
        "HealthCheck": ("HealthCheckRequest", "HealthCheckResponse"),
        "CancelImageTask": ("CancelImageTaskRequest", "CancelImageTaskResponse"),
        "ListImageTasks": ("ListImageTasksRequest", "ListImageTasksResponse"),
        "GetUsage": ("GetUsageRequest", "GetUsageResponse"),
        "StreamSequentialImages": (
            "GenerateSequentialImagesRequest",
            "StreamSequentialImagesResponse",
        ),
        "GenerateSequentialImagesAsync": (
            "GenerateSequentialImagesRequest",
            "GenerateImageAsyncResponse",
        ),
        "WatchImageTask": ("WatchImageTaskRequest", "GetImageTaskResponse"),
    }
    watermark = pb.GenerateImageRequest.DESCRIPTOR.fields_by_name["watermark"]
    assert watermark.has_presence, "watermark must tell unset from false"
