"""The web chat `care serve` serves at / (care/runtime/web), in a real browser: Debian's headless chromium,
driven by Selenium with Debian's chromium-driver (`make web-tools` installs both, as root). A real uvicorn server
on 127.0.0.1 serves the real app over the scripted FakeEngine.

Checked on screen: a flagged message shows the notice, then the first-aid card, then (asked for anyway) the
labelled reply; model text cannot inject HTML or script; a missing or wrong key gets the 401 and the key form,
a pairing link's key works and leaves the address bar; chats survive a reload. Screenshots at phone (360 x 740)
and laptop (1280 x 800) size are written to .cache/tests/artifacts/.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from care.runtime.server import WEB_FILES, create_app
from care.tui.testing import FakeEngine

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / ".cache" / "tests" / "artifacts"
EMERGENCY = "my father has crushing chest pain and is sweating"
XSS = 'Here: <img src=x onerror="document.title=\'pwned\'"> <script>document.title="pwned2"</script> **bold** done.'


def test_page_weight_is_under_150_kb():
    web = REPO / "care" / "runtime" / "web"
    total = sum((web / name).stat().st_size for name in WEB_FILES)
    assert total <= 150 * 1024, total
    html = (web / "index.html").read_text(encoding="utf-8")
    assert "http" not in html.replace("http-equiv", "")  # nothing from a CDN: every file is this server's


def _chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed: pip install 'care[dev]'")
    binary, driver_path = _chromium(), shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed: run `make web-tools` (as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=360,740",
                "--disable-gpu", "--no-first-run", "--lang=en"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)  # explicit driver: no download
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _serve(app) -> tuple[str, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    return f"http://127.0.0.1:{port}", server


@pytest.fixture
def served():
    servers = []

    def start(engine, **kw) -> str:
        url, server = _serve(create_app(engine, domain="auto", **kw))
        servers.append(server)
        return url

    yield start
    for s in servers:
        s.should_exit = True


def _wait(driver, cond, timeout: float = 20.0):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page: " + driver.find_element("id", "log").text[-500:])


def _send(driver, text: str) -> None:
    box = driver.find_element("id", "text")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def _kinds(driver) -> list[str]:
    """The blocks of the conversation, in order (read in one script call: the page re-draws as it streams)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#log > .msg')].map(e => e.className.replace('msg ', ''))")


def _texts(driver, selector: str) -> list[str]:
    return driver.execute_script(f"return [...document.querySelectorAll({selector!r})].map(e => e.innerText)")


def _idle(driver) -> bool:
    return not driver.execute_script("return document.getElementById('send').disabled")


def _fresh(driver, url: str) -> None:
    driver.get(url)
    driver.execute_script("localStorage.clear()")
    driver.get(url)


def test_emergency_shows_notice_then_card_then_the_reply_asked_for(browser, served):
    url = served(FakeEngine(["Sit down and rest while help comes. Loosen tight clothing."]))
    _fresh(browser, url + "/")
    _send(browser, EMERGENCY)
    _wait(browser, lambda: "ask" in _kinds(browser) and _idle(browser))
    assert _kinds(browser) == ["user", "notice", "card", "ask"]
    assert "heart attack" in _texts(browser, ".notice")[0]
    assert browser.execute_script("return getComputedStyle(document.querySelector('.notice')).borderTopStyle") == "solid"
    steps = _texts(browser, ".card li")
    assert len(steps) >= 3 and "Call your local emergency number" in steps[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(360, 740)
    browser.save_screenshot(str(ARTIFACTS / "web-phone-360x740.png"))
    browser.find_element("css selector", ".ask button").click()
    _wait(browser, lambda: "assistant" in _kinds(browser) and _idle(browser))
    assert _kinds(browser) == ["user", "notice", "card", "unvetted", "assistant"]
    assert "not vetted" in _texts(browser, ".unvetted")[0]
    assert "Sit down and rest while help comes." in _texts(browser, ".assistant")[0]
    browser.set_window_size(1280, 800)
    browser.save_screenshot(str(ARTIFACTS / "web-laptop-1280x800.png"))
    browser.set_window_size(360, 740)


def test_model_text_cannot_inject_html_or_script(browser, served):
    url = served(FakeEngine([XSS]))
    _fresh(browser, url + "/")
    title = browser.title
    _send(browser, "How do I block my card?")
    _wait(browser, lambda: _idle(browser) and "done." in "".join(_texts(browser, ".assistant")))
    reply = _texts(browser, ".assistant")[0]
    assert "<img src=x" in reply and "<script>" in reply  # shown as text
    assert browser.execute_script("return document.querySelectorAll('#log img, #log script').length") == 0
    assert browser.title == title  # neither handler ran
    assert _texts(browser, ".assistant strong") == ["bold"]  # Markdown still works


def test_key_missing_wrong_then_right_and_a_pairing_link(browser, served):
    url = served(FakeEngine(["Block it in the app."]), api_key="clinic-key-42")
    _fresh(browser, url + "/")
    _send(browser, "How do I block my card?")
    form = _wait(browser, lambda: browser.find_element("id", "key-form").is_displayed() and
                 browser.find_element("id", "key-form"))
    assert "key is missing or wrong" in browser.find_element("id", "banner").text
    browser.find_element("id", "key").send_keys("not-it")
    form.find_element("css selector", "button").click()
    _wait(browser, lambda: browser.find_element("id", "key-form").is_displayed())
    assert "key is missing or wrong" in browser.find_element("id", "banner").text
    browser.find_element("id", "key").send_keys("clinic-key-42")
    browser.find_element("css selector", "#key-form button").click()
    _wait(browser, lambda: _idle(browser) and _texts(browser, ".assistant"))
    assert "Block it in the app." in _texts(browser, ".assistant")[0]
    # A phone that scanned the QR code: the key comes in the link and leaves the address bar at once.
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/#key=clinic-key-42")
    assert "#key" not in browser.current_url
    _send(browser, "and my PIN?")
    # The key from the link is accepted: the turn is answered (a reply, or a notice if triage flags it; the
    # classifier has read this short follow-up as an allergy emergency, a known false alarm), no key form.
    _wait(browser, lambda: _idle(browser) and (_texts(browser, ".assistant") or _texts(browser, ".notice")))
    assert not browser.find_element("id", "key-form").is_displayed()
    assert "key is missing or wrong" not in browser.find_element("id", "banner").text


def test_chats_survive_a_reload_and_new_chat_starts_empty(browser, served):
    url = served(FakeEngine(["Block it in the app."]))
    _fresh(browser, url + "/")
    _send(browser, "How do I block my card?")
    _wait(browser, lambda: _idle(browser) and _texts(browser, ".assistant"))
    browser.refresh()
    assert _kinds(browser) == ["user", "assistant"]
    browser.find_element("id", "new").click()
    assert _kinds(browser) == []
    browser.find_element("id", "menu").click()
    assert len(browser.find_elements("css selector", "#chat-list li")) == 2
