"""The domain's id helpers."""

from __future__ import annotations

import re

from sia.domain import new_request_id, new_task_id


def test_request_ids_are_32_hex_digits_and_distinct() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_task_ids_are_prefixed_and_url_safe() -> None:
    ids = {new_task_id() for _ in range(1_000)}
    assert len(ids) == 1_000
    assert all(re.fullmatch(r"task_[A-Za-z0-9_-]{24}", i) for i in ids)
