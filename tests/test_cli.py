"""The `sia` command's process set-up (serving itself is tested through `sia serve` elsewhere)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from sia import cli


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    older = gc.get_threshold()[1:]
    cli.tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, *older)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_trim_is_found_on_glibc() -> None:
    trim = cli.malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was returned to the OS


def test_parser_knows_both_commands() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).command == "serve"
    assert parser.parse_args(["fake-ark"]).command == "fake-ark"  # main() hands on its arguments
