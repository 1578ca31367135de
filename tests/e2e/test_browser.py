"""A real browser: Playwright driving Debian's Chromium against the service and the fake."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from support import require, service, wait_complete

CHROMIUM = os.environ.get("COINS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    require(os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM}: apt-get install chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    opened = context.new_page()
    opened.problems = []
    opened.on("console", lambda message: message.type == "error" and opened.problems.append(
        (message.text, message.location.get("url", ""))))
    opened.on("pageerror", lambda error: opened.problems.append((str(error), "")))
    yield opened
    context.close()


def test_a_batch_bar_fills_as_the_worker_runs(page, capsys):
    from playwright.sync_api import expect

    coins = [f"coin-{i:05d}" for i in range(1, 31)]
    with FakeCoinGecko(FakeOptions(latency=0.3), FakeData(coins=30)) as fake, \
            service(fake.url, COINGECKO_RATE_LIMIT="60000") as svc:
        page.goto(svc.url + "/")
        expect(page.get_by_text("No batches yet")).to_be_visible()
        batch = requests.post(f"{svc.url}/coins", json={"coins": coins, "last": True}).json()["batch"]
        bar = page.get_by_role("progressbar", name=f"batch {batch}")
        expect(bar).to_have_attribute("aria-valuemax", "30", timeout=10_000)
        page.wait_for_function(
            "([name]) => { const bar = document.querySelector(`[aria-label='${name}']`);"
            " const now = Number(bar.getAttribute('aria-valuenow')); return now > 0 && now < 30; }",
            arg=[f"batch {batch}"], timeout=15_000)
        shot = os.path.join(tempfile.mkdtemp(prefix="status-page-"), "during-a-run.png")
        page.screenshot(path=shot, full_page=True)
        with capsys.disabled():
            sys.stdout.write(f"\nscreenshot of the status page during a run: {shot}\n")
        expect(bar).to_have_attribute("aria-valuenow", "30", timeout=30_000)
        expect(page.locator(".batch-state").first).to_have_text("complete", timeout=10_000)
        expect(page.locator("#latest li").first).to_be_visible()
        assert page.problems == []


def test_the_alert_shows_a_refused_key_and_goes_once_it_is_accepted(page):
    from playwright.sync_api import expect

    with FakeCoinGecko(FakeOptions(api_key="CG-right"), FakeData(coins=5)) as fake, \
            service(fake.url, COINGECKO_API_KEY="CG-wrong", WORKER_PAUSE_SECONDS="0.5",
                    COINGECKO_RATE_LIMIT="600") as svc:
        requests.post(f"{svc.url}/coins", json=["bitcoin"])
        page.goto(svc.url + "/")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("error 10002", timeout=15_000)
        expect(alert).to_contain_text("COINGECKO_API_KEY")
        fake.configure(api_key="CG-wrong")
        expect(alert).to_be_hidden(timeout=20_000)
        expect(page.locator("#worker-state")).to_have_text("running")
        assert "CG-wrong" not in page.content()
        # While paused, /healthz answers 503 (the contract), which Chromium may log as a failed load.
        paused = "Failed to load resource: the server responded with a status of 503 (SERVICE UNAVAILABLE)"
        assert [problem for problem, _ in page.problems if problem != paused] == []


def test_the_page_is_readable_at_360_px(browser):
    context = browser.new_context(viewport={"width": 360, "height": 740})
    page = context.new_page()
    with FakeCoinGecko(data=FakeData(coins=5)) as fake, service(fake.url) as svc:
        for coins in (["bitcoin", "tether"], ["a-very-long-coin-id-" * 8]):
            requests.post(f"{svc.url}/coins", json=coins)
        page.goto(svc.url + "/")
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        bar = page.get_by_role("progressbar").first.bounding_box()
    context.close()

    assert widths[0] <= widths[1] == 360
    assert bar["x"] >= 0 and bar["x"] + bar["width"] <= 360


def test_the_page_follows_a_clear_and_a_deleted_batch_without_a_reload(page):
    from playwright.sync_api import expect

    with FakeCoinGecko(data=FakeData(coins=10)) as fake, service(fake.url, COINGECKO_RATE_LIMIT="60000") as svc:
        first = requests.post(f"{svc.url}/coins", json={"coins": ["coin-00001", "coin-00002"], "last": True})
        wait_complete(svc.url, first.json()["batch"])
        page.goto(svc.url + "/")
        latest = page.locator("#latest")
        expect(latest).to_contain_text("coin-00002")

        requests.delete(f"{svc.url}/coins")
        second = requests.post(f"{svc.url}/coins", json={"coins": ["coin-00003"], "last": True}).json()["batch"]
        wait_complete(svc.url, second)
        expect(latest).to_contain_text("coin-00003", timeout=20_000)
        expect(latest.locator("li")).to_have_count(1)
        expect(page.get_by_role("progressbar", name=f"batch {first.json()['batch']}")).to_have_count(0)

        requests.delete(f"{svc.url}/batches/{second}")
        expect(page.get_by_text("No batches yet")).to_be_visible(timeout=20_000)
        assert page.problems == []
