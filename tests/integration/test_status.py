"""The status page, /metrics and /openapi.json; schemathesis holds every answer to the document."""

from __future__ import annotations

import json
import re

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from config import Config
from fake_coingecko import FakeCoinGecko, FakeData
from fuzzing_document import fuzzing_document
from support import ROOT, service, wait_complete

DOCUMENT = ROOT / "web" / "openapi.json"
SCHEMA = schemathesis.openapi.from_dict(fuzzing_document(json.loads(DOCUMENT.read_text())))
IGNORED_METHODS = {"HEAD", "OPTIONS"}


def test_the_document_and_the_routes_match_exactly():
    app = create_app(Config(api_url="http://127.0.0.1:9/api/v3"), start_worker=False)
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods - IGNORED_METHODS
    }
    document = json.loads(DOCUMENT.read_text())
    documented = {(path, method) for path, item in document["paths"].items() for method in item}

    assert document["openapi"].startswith("3.1")
    assert routes == documented


@pytest.fixture(scope="module")
def live():
    with FakeCoinGecko(data=FakeData(coins=20)) as fake, service(fake.url, COINGECKO_RATE_LIMIT="60000") as svc:
        yield svc.url


@SCHEMA.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_answer_conforms_to_the_document(case, live):
    case.call_and_validate(base_url=live)


def metric_values(text: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_agree_with_healthz_and_the_fakes_count_after_a_run():
    data = FakeData(coins=30)
    coins = ["bitcoin", "tether", "not-a-coin", "zero-tickers"] + [f"coin-{i:05d}" for i in range(1, 21)]
    with FakeCoinGecko(data=data) as fake, service(fake.url, COINGECKO_RATE_LIMIT="60000") as svc:
        batch = requests.post(f"{svc.url}/coins", json={"coins": coins, "last": True}).json()["batch"]
        wait_complete(svc.url, batch)
        requests.get(f"{svc.url}/coins/nowhere/else")
        health = requests.get(f"{svc.url}/healthz").json()
        scraped = requests.get(f"{svc.url}/metrics")
        served = fake.stats.snapshot()

    assert scraped.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values = metric_values(scraped.text)
    for status, count in health["coins"].items():
        assert values[("coin_retriever_coins", (("status", status),))] == count
    assert values[("coin_retriever_queue_length", ())] == health["queue"] == 0
    assert values[("coin_retriever_upstream_requests_total", (("result", "ok"),))] == served["statuses"]["200"]
    assert values[("coin_retriever_upstream_request_duration_seconds_count", ())] == served["calls"]
    assert values[("coin_retriever_credits_used", ())] == health["credits"]["used"] == served["statuses"]["200"]
    assert values[("coin_retriever_rate_limit_per_minute", ())] == 60000
    assert values[("coin_retriever_worker_paused", ())] == 0
    labels = (("method", "POST"), ("route", "/coins"), ("status", "202"))
    assert values[("coin_retriever_http_requests_total", labels)] == 1
    assert values[("coin_retriever_http_requests_total",
                   (("method", "GET"), ("route", "/coins/<path:coin_id>"), ("status", "404")))] == 1


def test_the_status_page_shows_each_batch_as_an_accessible_bar(make_app):
    app = make_app()
    http = app.test_client()
    batch = http.post("/coins", json={"coins": ["bitcoin", "bad/id", "tether"], "last": True}).get_json()["batch"]
    page = http.get("/").get_data(as_text=True)

    assert f'aria-label="batch {batch}"' in page
    assert 'role="progressbar"' in page and 'aria-valuemax="3"' in page and 'aria-valuenow="1"' in page
    assert 'role="alert"' in page and "http" not in re.sub(r'href="/[^"]*"|https?://www\.w3\.org', "", page).lower()
    for asset in ("/static/status.css", "/static/status.js"):
        assert asset in page and http.get(asset).status_code == 200
