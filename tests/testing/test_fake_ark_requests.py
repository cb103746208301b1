"""The fake Ark's error table and request checks, called directly (no server)."""

from __future__ import annotations

import pytest

from sia.models import ARK_MODELS, MAX_GROUP_IMAGES, SEEDREAM_3_0_T2I, SEEDREAM_4_0
from sia.testing.fake_ark_requests import ERRORS, ArkReject, Job, error_status, validate


def test_error_status_of_suffixed_codes() -> None:
    """Codes with a parameter or detail suffix map to their family's status."""
    assert error_status("MissingParameter.prompt") == 400
    assert error_status("SensitiveContentDetected.SevereViolation") == 400
    assert error_status("NoSuchCode") is None


def test_reject_takes_status_and_message_from_the_table() -> None:
    """A known code brings its status and message; a suffixed one its family's status only."""
    known = ArkReject("QuotaExceeded")
    assert (known.status, known.args[0]) == (429, ERRORS["QuotaExceeded"][1])
    suffixed = ArkReject("MissingParameter.prompt")
    assert (suffixed.status, suffixed.args[0]) == (400, "The request failed.")
    assert ArkReject("NoSuchCode").status == 500
    assert ArkReject("NoSuchCode", status=503).status == 503


def test_validate_resolves_a_group_request() -> None:
    """A valid group request becomes a job with pixel dimensions and the group's bound."""
    body = {
        "model": SEEDREAM_4_0.id,
        "prompt": "a fox",
        "size": "2048x2048",
        "response_format": "b64_json",
        "sequential_image_generation": "auto",
    }
    assert validate(ARK_MODELS, body) == Job(
        model=SEEDREAM_4_0.id,
        prompt="a fox",
        width=2048,
        height=2048,
        b64=True,
        stream=False,
        group=True,
        max_images=MAX_GROUP_IMAGES,
    )


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ([], "InvalidParameter", None),
        ({"prompt": "a fox"}, "MissingParameter", "model"),
        ({"model": "no-such-model", "prompt": "a fox"}, "InvalidEndpointOrModel.NotFound", "model"),
        (
            {
                "model": SEEDREAM_3_0_T2I.id,
                "prompt": "a fox",
                "sequential_image_generation": "auto",
            },
            "InvalidParameter",
            "sequential_image_generation",
        ),
    ],
)
def test_validate_rejects_as_ark_would(body: object, code: str, param: str | None) -> None:
    """An invalid body raises the ArkReject the real API answers."""
    with pytest.raises(ArkReject) as caught:
        validate(ARK_MODELS, body)
    assert (caught.value.code, caught.value.param) == (code, param)
