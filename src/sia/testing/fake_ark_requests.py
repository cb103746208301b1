"""What the fake Ark accepts: Ark's error table and the checks of a generation request.

The rules follow docs/providers.md ("Ark wire notes") and the model catalogue
of `sia.models`; `validate` turns a request body into a `Job` or raises the
`ArkReject` the real API would answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from sia.models import (
    ADAPTIVE,
    KEYWORD_DIMENSIONS,
    MAX_GROUP_IMAGES,
    SEEDREAM_4_5,
    parse_dimensions,
)
from sia.testing.fake_upstream import Reject

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sia.models import ModelSpec

#: Every error code Ark documents: HTTP status and message.
ERRORS: Mapping[str, tuple[int, str]] = {
    "MissingParameter": (400, "The request is missing a required parameter."),
    "InvalidParameter": (400, "A parameter specified in the request is not valid."),
    "InvalidEndpoint.ClosedEndpoint": (400, "The endpoint is closed."),
    "InputTextSensitiveContentDetected": (400, "The input text may contain sensitive content."),
    "InputImageSensitiveContentDetected": (400, "The input image may contain sensitive content."),
    "InputImageSensitiveContentDetected.PrivacyInformation": (
        400,
        "The input image may contain private information.",
    ),
    "InputImageSensitiveContentDetected.PolicyViolation": (
        400,
        "The input image may violate the usage policy.",
    ),
    "OutputImageSensitiveContentDetected": (400, "The image may contain sensitive content."),
    "SensitiveContentDetected": (400, "The request may contain sensitive content."),
    "InputImageRiskDetection": (400, "The input image failed the risk check."),
    "OutputImageRiskDetection": (400, "The output image failed the risk check."),
    "InputTextRiskDetection": (400, "The input text failed the risk check."),
    "AuthenticationError": (401, "the API key or AK/SK in the request is missing or invalid."),
    "AccountOverdueError": (403, "The account has an overdue balance."),
    "AccessDenied": (403, "You do not have access to the requested resource."),
    "OperationDenied.ServiceNotOpen": (403, "The model service is not activated."),
    "InvalidEndpointOrModel.NotFound": (404, "The model or endpoint does not exist."),
    "ModelNotOpen": (404, "The model is not activated for this account."),
    "InvalidEndpointOrModel.ModelIDAccessDisabled": (404, "Access to this model is disabled."),
    "ModelAccountIpmRateLimitExceeded": (429, "The images-per-minute limit was exceeded."),
    "RateLimitExceeded.EndpointRPMExceeded": (429, "The endpoint's RPM limit was exceeded."),
    "RateLimitExceeded.EndpointTPMExceeded": (429, "The endpoint's TPM limit was exceeded."),
    "ModelAccountRpmRateLimitExceeded": (429, "The model's RPM limit was exceeded."),
    "APIAccountRpmRateLimitExceeded": (429, "The account's RPM limit was exceeded."),
    "AccountRateLimitExceeded": (429, "The account's rate limit was exceeded."),
    "RequestBurstTooFast": (429, "The request rate rose too fast."),
    "ServerOverloaded": (429, "The service is overloaded; try again later."),
    "QuotaExceeded": (429, "The free quota is used up."),
    "SetLimitExceeded": (429, "The safe-experience limit set for this model was reached."),
    "InternalServiceError": (500, "The service encountered an unexpected internal error."),
}
ERROR_STATUS: Mapping[str, int] = {code: status for code, (status, _) in ERRORS.items()}

_DATA_URI = re.compile(r"data:image/([^;,]{1,32});base64,")


def error_status(code: str) -> int | None:
    """The HTTP status of an Ark error code, suffixes like `.prompt` included; None if unknown."""
    while code:
        if code in ERRORS:
            return ERRORS[code][0]
        code = code.rpartition(".")[0]
    return None


def http_type(status: int) -> str:
    """Ark's `type` for a status: the class name, e.g. "TooManyRequests"."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Error"


class ArkReject(Reject):
    """The request fails with an Ark error body."""

    status_of = staticmethod(error_status)

    @staticmethod
    def message_of(code: str) -> str | None:
        """The table's message; a suffixed code like `InvalidParameter.prompt` has none."""
        known = ERRORS.get(code)
        return None if known is None else known[1]


@dataclass(frozen=True, slots=True)
class Job:
    """A validated generation request."""

    model: str
    prompt: str
    width: int
    height: int
    b64: bool
    stream: bool
    group: bool
    max_images: int


def _bad(param: str, why: str) -> ArkReject:
    return ArkReject("InvalidParameter", f"The parameter `{param}` {why}", param)


def validate(models: Mapping[str, ModelSpec], body: Any) -> Job:
    """The request as a job, or the `ArkReject` the real API would answer."""
    if not isinstance(body, dict):
        raise ArkReject("InvalidParameter", "The request body must be a JSON object.")
    model, prompt = body.get("model"), body.get("prompt")
    if model is None or model == "":
        raise ArkReject("MissingParameter", "The parameter `model` is required.", "model")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise ArkReject("MissingParameter", "The parameter `prompt` is required.", "prompt")
    if not isinstance(model, str) or not isinstance(prompt, str):
        name = "model" if not isinstance(model, str) else "prompt"
        raise ArkReject("InvalidParameter", f"The parameter `{name}` must be a string.", name)
    spec = models.get(model)
    if spec is None:
        message = f"The model or endpoint {model} does not exist or you do not have access to it."
        raise ArkReject("InvalidEndpointOrModel.NotFound", message, "model")

    refs = _references(spec, body.get("image"))
    size = body.get("size")
    size = spec.default_size if size is None else size
    if not isinstance(size, str):
        raise _bad("size", "must be a string.")
    problem = spec.check_size(size)
    if problem is not None:
        raise _bad("size", f"specified in the request is not valid: {problem}.")
    if size == ADAPTIVE:
        width, height = 1024, 1024
    else:
        width, height = KEYWORD_DIMENSIONS.get(size) or parse_dimensions(size) or (0, 0)

    group, max_images = _sequential(spec, body, len(refs))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean.")
    if stream and not spec.sequential:
        raise _bad("stream", f"is not supported by {spec.id}.")
    response_format = body.get("response_format")
    if response_format not in (None, "url", "b64_json"):
        raise _bad("response_format", "must be url or b64_json.")
    _options(spec, body)
    return Job(
        model=spec.id,
        prompt=prompt,
        width=width,
        height=height,
        b64=response_format == "b64_json",
        stream=bool(stream),
        group=group,
        max_images=max_images,
    )


def _options(spec: ModelSpec, body: dict[str, Any]) -> None:
    """Check the optional fields a model honours; ignore the others like Ark."""
    seed, scale = body.get("seed"), body.get("guidance_scale")
    if spec.seed and seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", "must be an integer.")
        if not -1 <= seed <= 2_147_483_647:
            raise _bad("seed", "must be in [-1, 2147483647].")
    if spec.guidance_scale and scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise _bad("guidance_scale", "must be a number.")
        if not 1 <= scale <= 10:
            raise _bad("guidance_scale", "must be in [1, 10].")
    watermark = body.get("watermark")
    if watermark is not None and not isinstance(watermark, bool):
        raise _bad("watermark", "must be a boolean.")
    options = body.get("optimize_prompt_options")
    mode = options.get("mode") if isinstance(options, dict) else None
    if mode not in (None, "standard", "fast") or (mode == "fast" and spec.id == SEEDREAM_4_5.id):
        raise _bad("optimize_prompt_options.mode", f"value {mode!r} is not supported.")


def _references(spec: ModelSpec, image: Any) -> list[Any]:
    refs: list[Any] = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(refs, list):
        raise _bad("image", "must be a string or a list of strings.")
    if refs and not spec.max_reference_images:
        raise _bad("image", f"is not supported by {spec.id}.")
    if not spec.min_reference_images <= len(refs) <= spec.max_reference_images:
        raise _bad(
            "image",
            f"takes {spec.min_reference_images} to {spec.max_reference_images} images "
            f"for {spec.id}, not {len(refs)}.",
        )
    for ref in refs:
        if not isinstance(ref, str):
            raise _bad("image", "must be a string or a list of strings.")
        if ref.startswith("data:"):
            match = _DATA_URI.match(ref)
            if match is None:
                raise _bad("image", "must be a URL or data:image/<format>;base64,<data>.")
            if match[1] != match[1].lower():
                raise _bad("image", f"format {match[1]!r} must be lowercase.")
        elif not ref.startswith(("http://", "https://")):
            raise _bad("image", "must be a URL or data:image/<format>;base64,<data>.")
    return refs


def _sequential(spec: ModelSpec, body: dict[str, Any], refs: int) -> tuple[bool, int]:
    mode = body.get("sequential_image_generation")
    if mode in (None, "disabled"):
        return False, 1
    if mode != "auto":
        raise _bad("sequential_image_generation", "must be auto or disabled.")
    if not spec.sequential:
        raise _bad("sequential_image_generation", f"is not supported by {spec.id}.")
    options = body.get("sequential_image_generation_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("sequential_image_generation_options", "must be an object.")
    max_images = (options or {}).get("max_images")
    if max_images is None:
        return True, MAX_GROUP_IMAGES - refs
    param = "sequential_image_generation_options.max_images"
    if isinstance(max_images, bool) or not isinstance(max_images, int):
        raise _bad(param, "must be an integer.")
    if not 1 <= max_images <= MAX_GROUP_IMAGES:
        raise _bad(param, f"must be in [1, {MAX_GROUP_IMAGES}].")
    if refs + max_images > MAX_GROUP_IMAGES:
        raise _bad(param, f"plus {refs} reference images exceeds {MAX_GROUP_IMAGES}.")
    return True, max_images
