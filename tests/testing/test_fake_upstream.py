"""The core every fake shares (log, script, ids, lifecycle), run against each fake in turn."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from sia.models import SEEDREAM_4_0
from sia.testing import fake_ark, fake_openai
from sia.testing.fake_upstream import TRIGGER_LATENCY, FakeUpstream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

KEY = "sk-test-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass(frozen=True)
class Api:
    """What a test needs to drive one fake: how to build it and a valid request."""

    name: str
    fake: type[FakeUpstream[Any]]
    error: type[fake_ark.FakeError] | type[fake_openai.FakeError]
    path: str
    model: str
    code: str  # an error code of the API's table answered with 429

    def body(self, prompt: str = "a red fox") -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt}


APIS = [
    Api(
        "fake-ark",
        fake_ark.FakeArk,
        fake_ark.FakeError,
        fake_ark.GENERATIONS_PATH,
        SEEDREAM_4_0.id,
        "QuotaExceeded",
    ),
    Api(
        "fake-openai",
        fake_openai.FakeOpenAI,
        fake_openai.FakeError,
        fake_openai.GENERATIONS_PATH,
        "gpt-image-1",
        "rate_limit_exceeded",
    ),
]


@pytest.fixture(params=APIS, ids=[api.name for api in APIS])
def api(request: pytest.FixtureRequest) -> Api:
    result: Api = request.param
    return result


@pytest.fixture
async def fake(api: Api) -> AsyncIterator[FakeUpstream[Any]]:
    async with api.fake(api_key=KEY) as server:
        yield server


async def post(
    fake: FakeUpstream[Any],
    api: Api,
    session: aiohttp.ClientSession,
    prompt: str = "a red fox",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    """POST a generation and return status, parsed JSON body and the response."""
    async with session.post(
        fake.base_url + api.path,
        json=api.body(prompt),
        headers=AUTH if headers is None else headers,
    ) as response:
        return response.status, await response.json(), response


async def test_script_strings_are_consumed_in_order(
    fake: FakeUpstream[Any], api: Api, session: aiohttp.ClientSession
) -> None:
    """A scripted error code and "ok" answer the next two requests, then service resumes."""
    fake.script(api.code, "ok")
    assert fake.scripted == 2
    statuses = [(await post(fake, api, session))[0] for _ in range(3)]
    assert statuses == [429, 200, 200]
    assert fake.scripted == 0
    assert [r.outcome for r in fake.requests] == [f"error:{api.code}", "ok", "ok"]
    assert (fake.generations, fake.images_generated) == (2, 2)


async def test_scripted_unknown_code_needs_a_status(
    fake: FakeUpstream[Any], api: Api, session: aiohttp.ClientSession
) -> None:
    """An error code outside the API's table is refused, unless the script gives its status."""
    with pytest.raises(ValueError, match="NoSuchCode"):
        api.error("NoSuchCode")
    fake.script(api.error("NoSuchCode", status=503, retry_after=2))
    status, body, response = await post(fake, api, session)
    assert status == 503
    assert body["error"]["code"] == "NoSuchCode"
    assert response.headers["Retry-After"] == "2"


async def test_refused_key_keeps_the_script(
    fake: FakeUpstream[Any], api: Api, session: aiohttp.ClientSession
) -> None:
    """A request with a wrong key is answered 401 and leaves the scripted outcome queued."""
    fake.script(api.code)
    status, _, _ = await post(fake, api, session, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert fake.scripted == 1


async def test_every_response_carries_a_request_id(
    fake: FakeUpstream[Any], api: Api, session: aiohttp.ClientSession
) -> None:
    """Answers carry the logged request id; other routes, 404s included, get one too."""
    _, _, response = await post(fake, api, session)
    assert response.headers[fake.request_id_header] == fake.requests[-1].request_id
    async with session.get(fake.base_url + "/nowhere") as response:
        assert response.status == 404
        assert response.headers[fake.request_id_header]


async def test_bad_trigger_is_a_prompt_error(
    fake: FakeUpstream[Any], api: Api, session: aiohttp.ClientSession
) -> None:
    """A malformed shared trigger word is a 400 naming the prompt and the fake."""
    status, body, _ = await post(fake, api, session, TRIGGER_LATENCY.format("soon"))
    assert status == 400
    assert body["error"]["param"] == "prompt"
    assert body["error"]["message"].startswith(f"{api.name}: bad trigger")


async def test_log_keeps_the_last_max_records(api: Api, session: aiohttp.ClientSession) -> None:
    """The log drops its oldest entries once it holds twice max_records."""
    async with api.fake(api_key=KEY, max_records=2) as fake:
        ids = []
        for _ in range(5):
            _, _, response = await post(fake, api, session)
            ids.append(response.headers[fake.request_id_header])
        assert [r.request_id for r in fake.requests] == ids[-3:]
        assert fake.generations == 5


async def test_reset_forgets_log_script_and_counters(
    fake: FakeUpstream[Any], api: Api, session: aiohttp.ClientSession
) -> None:
    """reset() empties the log and the script and zeroes the counters."""
    await post(fake, api, session)
    fake.script("ok")
    fake.reset()
    assert (fake.requests, fake.scripted, fake.generations, fake.images_generated) == (
        [],
        0,
        0,
        0,
    )


async def test_close_cancels_requests_in_flight(api: Api, session: aiohttp.ClientSession) -> None:
    """Closing the fake during a slow request logs it as cancelled, not as the client's doing."""
    fake = api.fake(api_key=KEY)
    await fake.start()
    pending = asyncio.create_task(post(fake, api, session, TRIGGER_LATENCY.format(30)))
    while not fake.requests and not pending.done():
        await asyncio.sleep(0.01)
    await fake.close()
    await fake.close()  # idempotent
    with pytest.raises(aiohttp.ClientError):
        await pending
    assert fake.requests[-1].outcome == "cancelled"
