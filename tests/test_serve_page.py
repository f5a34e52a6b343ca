"""Serve, the page: a real browser (Debian's Chromium, driven by Playwright) against the real server.

Chromium is expected at /usr/bin/chromium (apt package `chromium`; .ci/run installs it); without it the browser
tests fail, saying so.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.serving")  # before its import: it is also this module's plugin

from tests.serving import data_url_image, png  # noqa: E402

pytest_plugins = ["tests.serving"]  # the session's server, shared with the other serve test modules

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; the tests fail with what to install when it is missing (they install nothing)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    return CHROMIUM


def wait_for(page: Any, expression: str, arg: Any = None, timeout: float = 30_000) -> None:
    """page.wait_for_function, polled from the test: Playwright's own builds its predicate with eval inside the
    page, which the page's Content-Security-Policy forbids (page.evaluate is not subject to it)."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"not true within {timeout / 1000:g} s: {expression}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_the_page_classifies_an_uploaded_image(browser, server, client, cifar, tmp_path):
    image = tmp_path / "test-image-0.png"
    image.write_bytes(png(cifar.test_images[0]))
    expected = client.post("/predict", files={"file": ("x.png", image.read_bytes())}).json()["results"][0]
    page = browser.new_page(viewport={"width": 900, "height": 900})
    console_errors: list[str] = []
    # the browser logs every 4xx answer as a console error; the refused text file below is one, on purpose
    page.on(
        "console",
        lambda m: (
            console_errors.append(m.text) if m.type == "error" and "status of 415" not in m.text else None
        ),
    )
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    external: list[str] = []
    page.on(
        "request",
        lambda r: external.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else None,
    )
    page.goto(server.url + "/")
    wait_for(page, "document.querySelector('#model-info').textContent.includes('seed_cnn')")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector(".card[data-state=done] .top-class", timeout=30_000)
    card = page.locator(".card").first
    assert card.locator(".top-class").inner_text().lower() == expected["predictions"][0]["class"]
    assert card.locator(".bar-row").count() == 5
    assert card.locator(".bar-row .label").first.inner_text() == expected["predictions"][0]["class"]
    assert card.locator(".seen").is_visible()  # the 32x32 input is shown

    # drag and drop a second image, and a file that is not an image
    drop = page.evaluate_handle(
        """([b64, name]) => { const dt = new DataTransfer();
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             dt.items.add(new File([bytes], name, {type: 'image/png'})); return dt; }""",
        [base64.b64encode(png(cifar.test_images[1], 128)).decode(), "ship.png"],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
    wait_for(page, "document.querySelectorAll('.card[data-state=done]').length === 2")
    junk = page.evaluate_handle(
        """() => { const dt = new DataTransfer(); dt.items.add(new File(['hello'], 'notes.txt', {type: 'text/plain'}));
             return dt; }"""
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": junk})
    page.wait_for_selector(".card[data-state=error]")
    assert "not an image" in page.locator(".card[data-state=error] .status").inner_text()
    shot = Path(os.environ.get("CIFAR10_SCREENSHOT_DIR", tmp_path)) / "serve-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not console_errors, console_errors
    assert not external, external  # nothing from outside the server: no CDN
    page.close()


def test_the_page_shows_a_heatmap_and_another_class_on_demand(browser, server, client, cifar, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(png(cifar.test_images[0]))
    page = browser.new_page(viewport={"width": 900, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    wait_for(page, "document.querySelector('#model-info').textContent.includes('seed_cnn')")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector(".card[data-state=done] .heatmap[data-state=done] .heatmap-img", timeout=60_000)
    card = page.locator(".card").first
    heat = card.locator(".heatmap-img")
    assert heat.is_visible()
    predicted = card.locator(".top-class").inner_text().lower()
    first = heat.get_attribute("src")
    assert heat.get_attribute("data-class") == predicted == card.locator(".explain-class").input_value()
    assert data_url_image(first).shape == (128, 128, 3)

    def shows(cls: str) -> str:
        wait_for(
            page,
            "c => { const f = document.querySelector('.card .heatmap');"
            " return f.dataset.state === 'done' && f.querySelector('.heatmap-img').dataset.class === c; }",
            arg=cls,
            timeout=60_000,
        )
        return heat.get_attribute("src")

    second = card.locator(".bar-row").nth(1)  # click the runner-up's bar
    runner_up = second.get_attribute("data-class")
    second.click()
    clicked = shows(runner_up)
    assert clicked != first and "explained" in (second.get_attribute("class") or "")
    api = client.post(
        "/predict", params={"explain_class": runner_up}, files={"file": ("cat.png", image.read_bytes())}
    )
    assert clicked == api.json()["results"][0]["explanation"]["png"]  # the map of that class, for this image
    last = next(c for c in ("truck", "frog") if c not in (predicted, runner_up))
    card.locator(".explain-class").select_option(last)  # any class, from the menu
    assert shows(last) not in (first, clicked)
    assert not errors, errors
    page.close()


def test_the_api_docs_render_offline(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "cifar10-cnn" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".opblock-summary-path", has_text="/predict").count() == 1
    page.close()


def test_the_security_policy_is_enforced_on_the_page_and_the_docs(browser, server):
    """The page runs under its policy (the tests above), and the policy does block: a script injected into the
    page does not run. /docs runs Swagger UI's own start script (allowed by its hash) with no violation."""
    page = browser.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(server.url + "/")
    wait_for(page, "document.querySelector('#model-info').textContent.includes('seed_cnn')")
    page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
        " document.body.append(s); }"
    )
    assert page.evaluate("() => window.injected") is None
    assert violations and "inline script" in violations[0], violations
    violations.clear()
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert not violations, violations
    page.close()
