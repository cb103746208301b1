"""The stored JSON of requests: every field round-trips, and older rows read with defaults."""

from __future__ import annotations

import json

from sia.domain import GenerationRequest, ResponseFormat
from sia.tasks.codec import request_from_json, request_to_json


def test_a_group_request_with_webhook_fields_round_trips() -> None:
    """max_images, webhook_url and webhook_images are stored and read back as they were."""
    request = GenerationRequest(
        prompt="a comic strip",
        model="seedream-4",
        size="2048x2048",
        response_format=ResponseFormat.B64_JSON,
        max_images=6,
        request_id="r-1",
        webhook_url="https://hooks.example.test/sia",
        webhook_images=True,
    )
    stored = json.loads(request_to_json(request))
    assert (stored["max_images"], stored["webhook_url"], stored["webhook_images"]) == (
        6,
        "https://hooks.example.test/sia",
        True,
    )
    assert request_from_json(request_to_json(request)) == request


def test_a_request_stored_before_the_webhook_fields_reads_with_their_defaults() -> None:
    """A row written before webhook_url and webhook_images existed reads as no webhook."""
    old = {"prompt": "a fox", "model": "m-1", "size": "1024x1024", "max_images": 3}
    request = request_from_json(json.dumps(old))
    assert (request.max_images, request.webhook_url, request.webhook_images) == (3, "", False)
    assert request.sequential
