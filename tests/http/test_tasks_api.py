"""The native task routes, their event stream and /openapi.json, over plain HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from openapi_spec_validator import validate

from sia.app import App
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE, MakeSettings


def base(app: App) -> str:
    """The app's HTTP base URL."""
    return f"http://127.0.0.1:{app.http_port}"


def auth(key: str) -> dict[str, str]:
    """Headers that present `key`."""
    return {"Authorization": f"Bearer {key}"}


async def submit(
    http: aiohttp.ClientSession, app: App, body: dict[str, Any], key: str = "none"
) -> dict[str, Any]:
    """POST /v1/tasks; the 202's task."""
    async with http.post(f"{base(app)}/v1/tasks", json=body, headers=auth(key)) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["X-Request-Id"]
        task: dict[str, Any] = await resp.json()
        return task


async def finished(
    http: aiohttp.ClientSession, app: App, task_id: str, key: str = "none"
) -> dict[str, Any]:
    """GET the task until it has ended."""
    for _ in range(200):
        async with http.get(f"{base(app)}/v1/tasks/{task_id}", headers=auth(key)) as resp:
            assert resp.status == 200
            task: dict[str, Any] = await resp.json()
        if task["status"] in ("succeeded", "failed", "cancelled"):
            return task
        await asyncio.sleep(0.05)
    raise AssertionError("the task did not finish")


async def test_submit_and_get_until_succeeded(app: App) -> None:
    """A submitted task is 202 queued, then succeeds with a downloadable image."""
    async with aiohttp.ClientSession() as http:
        task = await submit(http, app, {"prompt": "a cat", "size": TEST_SIZE, "request_id": "r1"})
        assert task["id"].startswith("task_")
        assert task["status"] in ("queued", "running")
        assert task["created_at"].endswith("Z")
        assert task["request_id"] == "r1"
        done = await finished(http, app, task["id"])
        assert done["status"] == "succeeded"
        assert done["finished_at"] is not None
        (image,) = done["images"]
        assert image["index"] == 0
        assert image["size"] == TEST_SIZE
        assert image["content_type"].startswith("image/")
        async with http.get(image["url"]) as resp:
            assert resp.status == 200
        again = await submit(http, app, {"prompt": "a cat", "size": TEST_SIZE, "request_id": "r1"})
        assert again["id"] == task["id"]  # idempotent by request_id


async def test_list_pages_newest_first(app: App) -> None:
    """GET /v1/tasks pages the caller's tasks newest first with next_page_token."""
    async with aiohttp.ClientSession() as http:
        ids = [
            (await submit(http, app, {"prompt": f"p{i}", "size": TEST_SIZE}))["id"]
            for i in range(3)
        ]
        for task_id in ids:
            await finished(http, app, task_id)
        seen: list[str] = []
        token = ""
        for _ in range(5):
            params = {"page_size": "2", "page_token": token, "status": "succeeded"}
            async with http.get(f"{base(app)}/v1/tasks", params=params) as resp:
                assert resp.status == 200
                page = await resp.json()
            assert len(page["data"]) <= 2
            seen += [task["id"] for task in page["data"]]
            token = page["next_page_token"]
            if not token:
                break
        assert seen == ids[::-1]
        async with http.get(f"{base(app)}/v1/tasks", params={"page_size": "0"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "page_size"


async def test_cancel_and_cancel_after_finish(make_settings: MakeSettings) -> None:
    """DELETE cancels a running task; cancelling a finished one is the FAILED_PRECONDITION
    status (400, code task_not_cancellable or the like)."""
    async with App(make_settings(offline_latency=5)) as app, aiohttp.ClientSession() as http:
        task = await submit(http, app, {"prompt": "slow", "size": TEST_SIZE})
        async with http.delete(f"{base(app)}/v1/tasks/{task['id']}") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "cancelled"
        async with http.post(f"{base(app)}/v1/tasks/{task['id']}/cancel") as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"]


async def test_another_keys_task_is_404(make_settings: MakeSettings) -> None:
    """Another key's task is a 404, exactly as a missing one; no key is a 401."""
    async with App(make_settings()) as app, aiohttp.ClientSession() as http:
        alice = await app_key(app, "alice")
        bob = await app_key(app, "bob")
        task = await submit(http, app, {"prompt": "a cat", "size": TEST_SIZE}, key=alice)
        url = f"{base(app)}/v1/tasks/{task['id']}"
        for method in ("GET", "DELETE"):
            async with http.request(method, url, headers=auth(bob)) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["type"] == "not_found_error"
        async with http.get(f"{url}/events", headers=auth(bob)) as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
        async with http.get(f"{base(app)}/v1/tasks", headers=auth(bob)) as resp:
            assert (await resp.json())["data"] == []
        async with http.get(url, headers=auth("sia_" + "x" * 43)) as resp:
            assert resp.status == 401
        await finished(http, app, task["id"], key=alice)


async def test_group_event_stream(make_settings: MakeSettings) -> None:
    """The events of an n=3 group show growing image counts, then the final state, and end."""
    async with App(make_settings(offline_latency=1.5)) as app, aiohttp.ClientSession() as http:
        task = await submit(http, app, {"prompt": "three views", "size": TEST_SIZE, "n": 3})
        events: list[dict[str, Any]] = []
        url = f"{base(app)}/v1/tasks/{task['id']}/events"
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            assert resp.headers["X-Request-Id"]
            kind = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    assert kind == "task"
                    events.append(json.loads(line.removeprefix("data: ")))
        counts = [len(event["images"]) for event in events]
        assert counts == sorted(counts)
        assert len(set(counts)) >= 3  # images arrived over time
        assert events[-1]["status"] == "succeeded"
        assert counts[-1] == 3
        assert all(event["status"] != "succeeded" for event in events[:-1])


async def test_event_stream_client_disconnect_ends_watch(make_settings: MakeSettings) -> None:
    """A client that goes away mid-stream ends the watch; the server keeps serving."""
    async with App(make_settings(offline_latency=3)) as app, aiohttp.ClientSession() as http:
        task = await submit(http, app, {"prompt": "slow", "size": TEST_SIZE})
        async with http.get(f"{base(app)}/v1/tasks/{task['id']}/events") as resp:
            assert resp.status == 200
            await resp.content.readline()
        await asyncio.sleep(0.1)
        async with http.get(f"{base(app)}/health") as resp:
            assert resp.status == 200


async def test_bad_field_is_400_naming_it(app: App) -> None:
    """A bad or unknown field is a 400 whose param names it."""
    cases = [
        ({"prompt": "a cat", "size": "10x10"}, "size"),
        ({"prompt": "a cat", "n": 0}, "n"),
        ({"prompt": "a cat", "images": "not-a-list"}, "images"),
        ({"prompt": "a cat", "images": ["ftp://x/y.png"]}, "images"),
        ({"prompt": "a cat", "webhook_each_image": True}, "webhook_each_image"),
        ({"prompt": "", "size": TEST_SIZE}, "prompt"),
        ({"prompt": "a cat", "colour": "red"}, "colour"),
        # gRPC's name sent over REST: named as sent, with the REST name to use
        ({"prompt": "a cat", "max_images": 3}, "max_images"),
        ({"prompt": "a cat", "n": 99}, "n"),  # validation's max_images, spelt as REST does
    ]
    async with aiohttp.ClientSession() as http:
        for body, param in cases:
            async with http.post(f"{base(app)}/v1/tasks", json=body) as resp:
                assert resp.status == 400, body
                error = (await resp.json())["error"]
                assert error["param"] == param, (body, error)
                assert error["message"].startswith((f"{param}: ", f"{param}[")), error
                assert error["code"] == "invalid_argument"
            if param == "max_images":
                assert error["message"].endswith("(here it is n)")
        async with http.post(f"{base(app)}/v1/tasks", data=b"[1]") as resp:
            assert resp.status == 400
        async with http.get(f"{base(app)}/v1/tasks", params={"status": "nope"}) as resp:
            assert (await resp.json())["error"]["param"] == "status"


async def test_openapi_document_validates(app: App) -> None:
    """/openapi.json is a valid OpenAPI 3.1 document naming every REST route."""
    async with aiohttp.ClientSession() as http, http.get(f"{base(app)}/openapi.json") as resp:
        assert resp.status == 200
        document = await resp.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    for path in (
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/models",
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/cancel",
        "/v1/tasks/{task_id}/events",
    ):
        assert path in document["paths"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "Error" in document["components"]["schemas"]
