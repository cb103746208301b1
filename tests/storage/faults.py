"""Disk faults for the local blob store's tests and the app's: honest, and undone after."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@contextlib.contextmanager
def unwritable(root: Path) -> Iterator[None]:
    """The images directory refuses writes until the block ends.

    As root, chmod does not stop writes, so the directory is moved aside and
    a plain file put in its place (the kernel's ENOTDIR, as honest a fault).
    """
    if os.geteuid() != 0:
        root.chmod(0o500)
        try:
            yield
        finally:
            root.chmod(0o700)
        return
    aside = root.with_name(root.name + "-aside")
    root.rename(aside)
    root.write_bytes(b"")
    try:
        yield
    finally:
        root.unlink()
        aside.rename(root)


@contextlib.contextmanager
def full_disk(
    monkeypatch: pytest.MonkeyPatch, *, image_writes: int | None = None
) -> Iterator[None]:
    """Writes of files stop part-way with ENOSPC, as on a full filesystem.

    With `image_writes` only that many image writes fail (the readiness
    probe's always do): then the disk has room again.
    """
    real = Path.write_bytes
    left = [image_writes]

    def write_bytes(self: Path, data: Any) -> int:
        if not self.name.endswith(".part") and not self.name.startswith(".ready-"):
            return real(self, data)  # image writes (`.part`) and readiness probes fail
        if not self.name.startswith(".") and left[0] is not None:
            if left[0] == 0:
                return real(self, data)
            left[0] -= 1
        with self.open("wb") as file:
            file.write(bytes(data)[:3])  # what fitted before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", write_bytes)
        yield


def part_files(root: Path) -> list[Path]:
    """Partial files a write left behind."""
    return [path for path in root.iterdir() if path.name.endswith(".part")]
