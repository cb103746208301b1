"""The web playground at / (`sia.http.playground`), driven in headless Chromium.

Playwright drives Debian's `chromium` (scripts/install-test-browser.sh installs it);
without it, or without playwright, the browser tests skip, and fail under CI=true.

`python -m tests.http.test_playground --screenshot` regenerates docs/playground.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from PIL import Image

from sia.app import App
from sia.config import Settings
from sia.http.playground import CONTENT_SECURITY_POLICY
from sia.logs import configure_logging
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE, MakeSettings

try:
    from playwright.async_api import Browser, Page, Playwright, async_playwright, expect
except ImportError:  # the browser fixture skips, or fails under CI=true
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")
#: Flags for a closed network and a root user: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Seconds the offline provider takes per group, spread over its images: events apart.
LATENCY = 0.6

# The app and the browser share the module's event loop: one browser for every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def launch(playwright: Playwright) -> Browser:
    """Headless Debian chromium, never a browser Playwright downloads."""
    return await playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
    )


def require_browser() -> None:
    """Skip when playwright or chromium is missing, or fail under CI=true."""
    missing = None
    if async_playwright is None:
        missing = "playwright is not installed: pip install -e '.[dev]'"
    elif not CHROMIUM.is_file():
        missing = f"{CHROMIUM} is missing: run scripts/install-test-browser.sh"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI must run the browser tests")
        pytest.skip(missing)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless chromium for the module."""
    require_browser()
    async with async_playwright() as playwright:
        running = await launch(playwright)
        yield running
        await running.close()


@pytest_asyncio.fixture(loop_scope="module")
async def app(make_settings: MakeSettings) -> AsyncIterator[App]:
    """A running app on the module's loop, its offline images a little apart."""
    async with App(make_settings(offline_latency=LATENCY)) as running:
        yield running


@contextlib.asynccontextmanager
async def playground(
    browser: Browser, app: App, *, width: int = 1200
) -> AsyncIterator[tuple[Page, list[str]]]:
    """The playground open in a fresh context (its own session storage); the page and
    the URLs it requested. Uncaught page errors fail the test."""
    # localhost, the host of the app's image links (no PUBLIC_URL): the images share the
    # page's origin, so their download links download.
    context = await browser.new_context(
        viewport={"width": width, "height": 900},
        base_url=f"http://localhost:{app.http_port}",
        accept_downloads=True,
    )
    try:
        page = await context.new_page()
        requests: list[str] = []
        failures: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: failures.append(str(error)))
        await page.goto("/")
        yield page, requests
        assert not failures, failures
    finally:
        await context.close()


async def generate(page: Page, prompt: str, count: int) -> None:
    """Fill the form and generate with Ctrl+Enter, as a keyboard user would."""
    await page.fill("#prompt", prompt)
    await page.fill("#size", TEST_SIZE)
    await page.fill("#n", str(count))
    await page.press("#prompt", "Control+Enter")


async def images_loaded(page: Page, count: int) -> None:
    """Wait until the gallery has `count` images, each loaded at TEST_SIZE."""
    images = page.locator("#gallery img")
    await expect(images).to_have_count(count)
    width = int(TEST_SIZE.split("x")[0])
    for index in range(count):
        await expect(images.nth(index)).to_have_js_property("naturalWidth", width)


async def test_generate_a_group(browser: Browser, app: App, tmp_path: Path) -> None:
    """A group of 3 appears image by image, one downloads, the task is listed, and the
    page fits a phone's width and loads nothing from elsewhere."""
    async with playground(browser, app) as (page, requests):
        await expect(page.locator("#model")).to_contain_text(app.settings.image_model)
        # Each gallery addition, with the status line of that moment.
        await page.evaluate(
            """() => {
                window.arrivals = [];
                const gallery = document.getElementById("gallery");
                new MutationObserver(() => window.arrivals.push([
                    gallery.children.length, document.getElementById("status").textContent,
                ])).observe(gallery, { childList: true });
            }"""
        )
        await generate(page, "three views of a lighthouse", 3)
        await expect(page.locator("#status")).to_have_text("Succeeded: 3 of 3 images")
        await images_loaded(page, 3)
        arrivals: list[list[Any]] = await page.evaluate("() => window.arrivals")
        assert arrivals[-1][0] == 3
        assert arrivals[0][1].startswith("Running:"), arrivals  # shown before the end

        async with page.expect_download() as info:
            await page.get_by_role("link", name="Download image 2").click()
        download = await info.value
        saved = tmp_path / download.suggested_filename
        await download.save_as(saved)
        with Image.open(saved) as image:
            assert (image.format, f"{image.width}x{image.height}") == ("JPEG", TEST_SIZE)
        task_id = download.suggested_filename.removesuffix("-2.jpeg")

        listed = page.locator("#tasks .task").first
        await expect(listed).to_contain_text(task_id)
        await expect(listed).to_contain_text("succeeded · 3 of 3")

        await page.set_viewport_size({"width": 375, "height": 800})
        widths = await page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert widths == [375, 375]

        await page.reload()  # a past task, shown again from the list
        await expect(page.locator("#gallery img")).to_have_count(0)
        await page.locator("#tasks .task").first.click()
        await images_loaded(page, 3)

        origin = f"http://localhost:{app.http_port}/"
        assert requests
        assert [url for url in requests if not url.startswith((origin, "data:"))] == []


async def test_validation_error_is_shown_next_to_its_field(browser: Browser, app: App) -> None:
    """The server's message about a bad size is rendered by the size field, focused."""
    async with playground(browser, app) as (page, _):
        await page.fill("#prompt", "a red fox")
        await page.fill("#size", "99x99")
        await page.click("#generate")
        error = page.locator("#size-error")
        await expect(error).to_contain_text("99x99 is 9,801 pixels")
        size = page.locator("#size")
        await expect(size).to_have_attribute("aria-invalid", "true")
        await expect(size).to_have_attribute("aria-describedby", "size-error")
        await expect(size).to_be_focused()
        await expect(page.locator("#banner")).to_be_empty()
        await expect(page.locator("#gallery img")).to_have_count(0)


async def test_api_key(browser: Browser, app: App) -> None:
    """With keys on the server, no key shows a 401 message at the key field; the key typed
    there works and stays in session storage only."""
    key = await app_key(app, "playground")
    async with playground(browser, app) as (page, _):
        key_error = page.locator("#key-error")
        await expect(key_error).to_contain_text("Enter an API key")  # from loading models
        await page.fill("#prompt", "a red fox")
        await page.click("#generate")
        await expect(page.locator("#key")).to_be_focused()
        await expect(page.locator("#key")).to_have_attribute("aria-invalid", "true")

        await page.fill("#key", key)
        await page.click("#generate")
        await expect(page.locator("#status")).to_have_text("Succeeded: 1 of 1 images")
        await expect(key_error).to_be_empty()
        stored = await page.evaluate(
            "() => [sessionStorage.getItem('sia-api-key'), localStorage.length]"
        )
        assert stored == [key, 0]
        assert key not in page.url


async def test_page_headers(app: App) -> None:
    """The page and its assets carry the CSP, revalidate by ETag, and 304 when unchanged."""
    base = f"http://127.0.0.1:{app.http_port}"
    async with aiohttp.ClientSession() as http:
        for path, kind in [
            ("/", "text/html"),
            ("/playground/app.js", "text/javascript"),
            ("/playground/style.css", "text/css"),
        ]:
            async with http.get(base + path) as resp:
                assert resp.status == 200
                assert resp.content_type == kind
                assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
                assert resp.headers["Cache-Control"] == "no-cache"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                etag = resp.headers["ETag"]
            async with http.get(base + path, headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY


async def test_playground_can_be_turned_off(make_settings: MakeSettings) -> None:
    """PLAYGROUND_ENABLED=false: no page at /, the API still there."""
    async with (
        App(make_settings(playground_enabled=False)) as running,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{running.http_port}"
        async with http.get(base + "/") as resp:
            assert resp.status == 404
        async with http.get(base + "/v1/models") as resp:
            assert resp.status == 200


async def screenshot(path: Path) -> None:
    """A group of four in the playground at desktop width, saved as a PNG at `path`."""
    configure_logging("warning", "console", cache=False)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_host="127.0.0.1",
            http_port=0,
            data_dir=Path(tmp),
            image_default_size=TEST_SIZE,
            offline_latency=LATENCY,
        )
        async with App(settings) as running, async_playwright() as playwright:
            browser = await launch(playwright)
            async with playground(browser, running) as (page, _):
                prompt = "A lighthouse on a rocky coast at dusk, in four seasons, watercolour"
                await generate(page, prompt, 4)
                await expect(page.locator("#status")).to_have_text("Succeeded: 4 of 4 images")
                await images_loaded(page, 4)
                await page.locator("#generate").focus()  # shows the focus ring
                png = await page.screenshot(full_page=True)
            await browser.close()
    # 256 colours keep the file small; the page is flat colour, the images placeholders.
    with Image.open(io.BytesIO(png)) as image:
        image.quantize(256).save(path, optimize=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["--screenshot"]:
        sys.exit("usage: python -m tests.http.test_playground --screenshot")
    target = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
    asyncio.run(screenshot(target))
    print(f"wrote {target} ({target.stat().st_size // 1024} KiB)")
