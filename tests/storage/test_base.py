"""The one image-key scheme every blob store uses."""

from __future__ import annotations

import pytest

from sia.errors import NotFound
from sia.storage.base import EXTENSIONS, check_key, content_type_of, is_key, new_key

VALID = "A" * 31 + "-.png"


@pytest.mark.parametrize("content_type", [*EXTENSIONS, "image/gif"])
def test_new_keys_have_the_scheme_and_differ(content_type: str) -> None:
    """Fresh keys are 32 url-safe characters and an extension, unguessable, and pass the check."""
    keys = {new_key(content_type) for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        stem, ext = key.split(".")
        assert len(stem) == 32
        assert ext == EXTENSIONS.get(content_type, "jpeg")
        assert check_key(key) == key


@pytest.mark.parametrize("key", [VALID, "_" * 32 + ".jpeg", "z" * 32 + ".webp"])
def test_keys_of_the_scheme_are_accepted(key: str) -> None:
    """The accepting side of each edge: exactly 32 characters, each known extension."""
    assert is_key(key)
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "A" * 31 + ".png",  # one character short
        "A" * 33 + ".png",  # one character long
        "A" * 31 + "/.png",  # a character outside the url-safe alphabet
        VALID + "/../x",  # a valid key followed by more
        VALID + "\n",
        "../" + VALID,
        "A" * 32 + ".gif",
        "A" * 32 + ".PNG",
        "A" * 32,
        "",
    ],
)
def test_anything_else_is_not_found(key: str) -> None:
    """The rejecting side: no prefix, suffix or lookalike passes, and the answer is NotFound."""
    assert not is_key(key)
    with pytest.raises(NotFound):
        check_key(key)


def test_not_found_message_is_bounded() -> None:
    """A huge key is not echoed back whole."""
    with pytest.raises(NotFound) as info:
        check_key("x" * 10_000)
    assert len(info.value.message) < 200


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (VALID, "image/png"),
        ("a.jpeg", "image/jpeg"),
        ("a.webp", "image/webp"),
        ("a.exe", "application/octet-stream"),
    ],
)
def test_content_type_of(key: str, expected: str) -> None:
    """Stored keys are served with their content type; others as octet-stream."""
    assert content_type_of(key) == expected
