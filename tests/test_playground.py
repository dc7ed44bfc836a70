"""The playground page (`GET /` of `llmqp serve`) in a real headless browser: Debian's chromium driven by
Selenium against the real server on a loopback port (the session's engine). Skipped only when chromium,
chromedriver or selenium are missing.

Set LLMQP_PLAYGROUND_SCREENSHOT=path to save a screenshot of the JSON-schema race (docs/playground.png is
made that way)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "playground-key"
GENERATION_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    """`create_app` on the session's engine, served by uvicorn from a thread (as in tests/test_server.py),
    with an API key so the page must send one."""
    import uvicorn

    from llmqp.server import ServerConfig, create_app

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    app = create_app(ServerConfig(port=port, api_key=KEY, max_batch=4), engine=engine)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       timeout_graceful_shutdown=30))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError("server did not become healthy")
    yield base
    uv.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"headless browser not installed ({', '.join(missing)} missing: "
                    "apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="llmqp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------------- over HTTP (no browser needed)
def test_page_loads_without_the_key_and_the_api_does_not(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="generate"' in page.text and "/static/app.js" in page.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = httpx.get(server + path)
        assert r.status_code == 200 and kind in r.headers["content-type"] and r.text
    assert httpx.get(server + "/static/missing.js").status_code == 404
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.post(server + "/v1/chat/completions", json={}).status_code == 401


def test_streamed_token_fields(server):
    """What the page draws from: per token its id, text, plan, K, step latency and log-prob; the tokens'
    texts add up to the deltas (ASCII output, so nothing is held back), forced tokens have K = 1 and
    log-prob 0."""
    body = {"messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 8, "temperature": 0,
            "stream": True, "structured_outputs": {"regex": "Answer: (yes|no)"}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [t for c in chunks for t in (c["choices"][0].get("llmqp") or {}).get("tokens", [])]
    deltas = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert re.fullmatch("Answer: (yes|no)", deltas), deltas
    assert "".join(t["text"] for t in tokens) == deltas
    assert all(set(t) == {"id", "text", "plan", "k", "latency_ms", "logprob"} for t in tokens), tokens
    forced = [t for t in tokens if t["plan"] == "forced"]
    assert forced and all(t["k"] == 1 and t["logprob"] == 0 for t in forced), tokens
    assert all(t["logprob"] <= 0 and t["latency_ms"] >= 0 and t["k"] >= 1 for t in tokens), tokens
    assert any(t["plan"] != "forced" and t["k"] >= 2 for t in tokens), tokens  # yes or no: a real choice


# ---------------------------------------------------------------------- in the browser
def _open(browser, server) -> None:
    """Load the page and enter the API key (the page keeps it in localStorage)."""
    browser.get(server + "/")
    key = browser.find_element("id", "api-key")
    browser.execute_script("arguments[0].closest('details').open = true", key)
    key.clear()
    key.send_keys(KEY)


def _choose(browser, element_id: str, *, value: str | None = None, text: str | None = None) -> None:
    from selenium.webdriver.support.ui import Select

    select = Select(browser.find_element("id", element_id))
    if value is not None:
        select.select_by_value(value)
    else:
        select.select_by_visible_text(text)


def _set(browser, element_id: str, text: str) -> None:
    element = browser.find_element("id", element_id)
    element.clear()
    # send_keys would type a JSON schema's braces through the key map; setting the value is exact.
    browser.execute_script("arguments[0].value = arguments[1]", element, text)


def _wait_lanes(browser, count: int) -> list:
    """Wait until `count` lanes exist and none is still running; returns the lane elements."""
    deadline = time.time() + GENERATION_TIMEOUT_S
    while time.time() < deadline:
        lanes = browser.find_elements("css selector", "#lanes .lane")
        states = [lane.get_attribute("data-state") for lane in lanes]
        if len(lanes) == count and all(s in ("done", "error") for s in states):
            return lanes
        time.sleep(0.1)
    raise AssertionError(f"generation did not finish in {GENERATION_TIMEOUT_S} s: states {states}")


def _output_text(browser, lane) -> str:
    return browser.execute_script("return arguments[0].querySelector('.output').textContent", lane)


def _lane_error(lane) -> str:
    error = lane.find_element("css selector", ".error")
    return error.text if error.is_displayed() else ""


def test_regex_streams_forced_tokens(browser, server):
    _open(browser, server)
    _set(browser, "prompt", "Is the sky blue? Answer yes or no.")
    _choose(browser, "constraint-kind", value="regex")
    pattern = "Answer: (yes|no)"
    _set(browser, "regex", pattern)
    _set(browser, "max-tokens", "16")
    _set(browser, "temperature", "0")
    browser.find_element("id", "generate").click()
    (lane,) = _wait_lanes(browser, 1)
    assert _lane_error(lane) == ""
    assert lane.get_attribute("data-state") == "done"
    text = _output_text(browser, lane)
    assert re.fullmatch(pattern, text), text
    spans = lane.find_elements("css selector", ".output .tok")
    plans = [s.get_attribute("data-plan") for s in spans]
    assert "forced" in plans, plans  # "Answer: " is forced by the regex
    assert len(lane.find_elements("css selector", ".output .tok.plan-forced")) >= 1
    # Every span carries the plan data the server streamed, and the stats show the token count.
    assert all(p in ("forced", "sparse", "sparse_union", "dense", "drafted") for p in plans), plans
    shown = int(lane.find_element("css selector", ".stat.tokens").text)
    assert shown >= len(spans) > 0
    # Hovering a token shows its details.
    from selenium.webdriver import ActionChains

    ActionChains(browser).move_to_element(spans[0]).perform()
    tip = browser.find_element("id", "tooltip")
    assert tip.is_displayed() and "K =" in tip.text and "log-prob" in tip.text and "forced" in tip.text


def test_bad_schema_shows_the_server_error(browser, server):
    _open(browser, server)
    _set(browser, "prompt", "Give me a record.")
    _choose(browser, "constraint-kind", value="json")
    _set(browser, "schema", json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}}))
    browser.find_element("id", "generate").click()
    (lane,) = _wait_lanes(browser, 1)
    assert lane.get_attribute("data-state") == "error"
    error = _lane_error(lane)
    assert "400" in error and "Invalid type: nope" in error, error
    assert _output_text(browser, lane) == ""


def test_missing_api_key_is_explained(browser, server):
    _open(browser, server)
    _set(browser, "api-key", "")
    browser.execute_script("localStorage.removeItem('llmqp.apiKey')")
    _choose(browser, "constraint-kind", value="none")
    browser.find_element("id", "generate").click()
    (lane,) = _wait_lanes(browser, 1)
    error = _lane_error(lane)
    assert "401" in error and "API key" in error, error


def test_json_schema_race(browser, server):
    """Race mode: the schema-constrained stream and the free one run at once; the constrained answer
    validates against the schema and used non-dense plans, the free one only dense steps."""
    _open(browser, server)
    _choose(browser, "constraint-kind", value="json")
    _choose(browser, "schema-example", text="Person")
    schema = json.loads(browser.find_element("id", "schema").get_attribute("value"))
    _set(browser, "max-tokens", "64")
    race = browser.find_element("id", "race")
    if not race.is_selected():
        race.click()
    browser.find_element("id", "generate").click()
    constrained, free = _wait_lanes(browser, 2)
    assert _lane_error(constrained) == "" and _lane_error(free) == ""
    value = json.loads(_output_text(browser, constrained))
    jsonschema.validate(value, schema)
    plans = {s.get_attribute("data-plan") for s in constrained.find_elements("css selector", ".output .tok")}
    assert plans & {"forced", "sparse", "sparse_union"}, plans
    free_plans = {s.get_attribute("data-plan") for s in free.find_elements("css selector", ".output .tok")}
    assert free_plans == {"dense"}, free_plans
    assert _output_text(browser, free)
    path = os.environ.get("LLMQP_PLAYGROUND_SCREENSHOT")
    if path:
        _screenshot(browser, path)


def _screenshot(browser, path: str) -> None:
    """The page after a (warm) single-stream JSON-schema generation, one sparse token's details pinned,
    in a 1280x900 viewport."""
    chrome = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(1280, 900 + chrome)
    browser.find_element("id", "race").click()
    for _ in range(2):  # the first run compiles this batch size's shapes; show a warm one
        browser.find_element("id", "generate").click()
        (lane,) = _wait_lanes(browser, 1)
    browser.execute_script("window.scrollTo(0, 0)")
    spans = lane.find_elements("css selector", ".output .tok.plan-sparse") or \
        lane.find_elements("css selector", ".output .tok")
    spans[len(spans) // 2].click()
    browser.save_screenshot(path)
