"""The console in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), against a real ``mailpolicy serve``:
a captured corpus, an edit, its preview, apply and reload, and an smtplib
session that gets the new reply. Saves the screenshots of docs/console.md.
"""

from __future__ import annotations

import http.server
import os
import shutil
import smtplib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_serve_cli
from console_helpers import ConsoleProcess
from test_operations import policy_text, start, wait_log
from test_serve_cli import ServeStarter

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: where the screenshots go: docs/console/ (the docs' pictures) when
#: MAILPOLICY_SCREENSHOTS=docs, else a temporary folder, so that an ordinary
#: test run leaves the working tree as it was
SHOTS = (
    Path(__file__).resolve().parent.parent / "docs" / "console"
    if os.environ.get("MAILPOLICY_SCREENSHOTS") == "docs"
    else Path(tempfile.gettempdir()) / "mailpolicy-console-shots"
)

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver): /usr/bin/chromium or /usr/bin/chromedriver is absent",
)

serve_cli = test_serve_cli.serve_cli


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    # the page itself 1280x800, whatever room the (invisible) window chrome takes
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: webdriver.Chrome, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def replaced(page: WebElement) -> Callable[[webdriver.Chrome], bool]:
    """A wait condition: the document whose root is ``page`` is gone.

    Selenium's ``staleness_of`` knows one answer for that, "stale element";
    while the next document is being attached, ChromeDriver may instead say
    the node "does not belong to the document" (seen in CI): the same fact.
    Any other error is one."""

    def gone(_driver: webdriver.Chrome) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as e:
            if "does not belong to the document" in (e.msg or ""):
                return True
            raise
        return False

    return gone


def submit(driver: webdriver.Chrome, element_id: str) -> None:
    """Click a submit button and wait until the next page has replaced this one."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, element_id).click()
    WebDriverWait(driver, 20).until(replaced(page))


def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def session(port: int, sender: str, helo: str = "client.example.org") -> int:
    """MAIL and RCPT to a local address; the RCPT reply's code."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=10) as c:
        assert c.mail(sender)[0] == 250
        code = c.rcpt("alice@example.com")[0]
        c.rset()
        return code


@pytest.mark.timeout(240)
def test_edit_preview_apply_in_chromium(
    browser: webdriver.Chrome,
    serve_cli: ServeStarter,
    free_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    policy, pid_file, captures = tmp_path / "policy.toml", tmp_path / "serve.pid", tmp_path / "cap"
    policy.write_text(policy_text(black=True))
    port, mport, cport = free_port(), free_port(), free_port()
    server = start(
        serve_cli, tmp_path, port, policy, "--pid-file", str(pid_file),
        "--metrics", f"127.0.0.1:{mport}", "--capture", str(captures),
    )  # fmt: skip

    # the corpus: three sessions from bad.example (accepted today), one refused
    for _ in range(3):
        assert session(port, "news@bad.example") == 250
    assert session(port, "deals@junk.example") == 554
    wait_for(lambda: len(list(captures.glob("*.expected.jsonl"))) >= 5)

    console = ConsoleProcess(
        [
            "--policy", str(policy), "--listen", f"127.0.0.1:{cport}",
            "--captures", str(captures), "--pid-file", str(pid_file),
            "--metrics", f"http://127.0.0.1:{mport}/metrics",
            "--decision-log", str(server.stderr_path),
        ],
        tmp_path,
        cport,
    )  # fmt: skip
    try:
        console.wait_listening()
        b = browser
        original = policy.read_bytes()

        # every section renders, with labels, values, Postfix names and help
        b.get(f"{console.url}/section/general")
        assert "smtpd_recipient_limit" in b.page_source
        assert b.find_element(By.ID, "general.max_recipients").get_attribute("value") == "1000"
        shot(b, "general")
        for slug in ("delivery", "relay", "sender", "connection", "advanced"):
            b.get(f"{console.url}/section/{slug}")
            assert b.find_elements(By.CSS_SELECTOR, "td.postfix"), slug
            shot(b, slug)

        # a bad value: its error next to the field, nothing changed
        b.get(f"{console.url}/section/general")
        field = b.find_element(By.ID, "general.max_recipients")
        field.clear()
        field.send_keys("-5")
        submit(b, "save")
        error = b.find_element(By.CSS_SELECTOR, '.field-error[data-key="general.max_recipients"]')
        assert error.text == "must not be negative, got -5"
        row = b.find_element(By.ID, "row-general.max_recipients")
        assert "bad" in (row.get_attribute("class") or "")
        assert not b.find_elements(By.ID, "pending")
        assert policy.read_bytes() == original
        shot(b, "general-error")

        # a new entry in the spammers list
        b.get(f"{console.url}/section/lists")
        b.find_element(By.CSS_SELECTOR, "#add-field option[value=sender]").click()
        b.find_element(By.ID, "add-value").send_keys("bad.example")
        submit(b, "add")
        assert b.find_element(By.ID, "pending")
        assert "bad.example" in b.find_element(By.CSS_SELECTOR, "table.entries").text
        b.find_element(By.ID, "search").send_keys("bad")
        page = b.find_element(By.TAG_NAME, "html")
        b.find_element(By.CSS_SELECTOR, "form.search button").click()
        WebDriverWait(b, 20).until(replaced(page))
        entries = b.find_element(By.CSS_SELECTOR, "table.entries").text
        assert "bad.example" in entries
        assert "junk.example" not in entries
        shot(b, "lists")
        assert policy.read_bytes() == original

        # the preview: the three sessions from bad.example would now be refused
        b.get(f"{console.url}/preview")
        summaries = [e.text for e in b.find_elements(By.CSS_SELECTOR, "li.summary")]
        assert summaries == [
            "3 sessions from 127.0.0.1 would now get 554 at RCPT, rule security.lists.spammers"
        ]
        assert "Sender address rejected: Access denied" in b.find_element(By.ID, "changes").text
        shot(b, "preview")
        assert policy.read_bytes() == original

        # apply: the file is written, the old one kept, the server reloaded
        submit(b, "apply")
        assert b.find_element(By.ID, "generation").text == "The server runs generation 2"
        assert (tmp_path / "policy.toml.bak").read_bytes() == original
        assert "bad.example" in policy.read_text()
        wait_log(server, lambda ln: "reloaded: generation 2" in str(ln.get("msg")))
        shot(b, "applied")
        assert session(port, "news@bad.example") == 554

        # live: the refusals by rule, polled from the server's metrics
        b.get(f"{console.url}/live")
        chart = "security.lists.spammers (2)"  # the one before the change, the one after
        wait_for(lambda: chart in b.find_element(By.ID, "chart").text)
        assert b.find_element(By.ID, "generation").text == "2"
        last = b.find_elements(By.CSS_SELECTOR, "#last tbody tr")
        assert len(last) == 2
        assert "news@bad.example" in last[0].text  # newest first, with its explanation
        assert "security.lists.spammers" in last[0].text
        assert "deals@junk.example" in last[1].text
        shot(b, "live")

        # try a session
        b.get(f"{console.url}/try")
        b.find_element(By.ID, "sender").send_keys("x@bad.example")
        b.find_element(By.ID, "rcpt").send_keys("alice@example.com")
        submit(b, "try-go")
        replies = b.find_element(By.ID, "replies").text
        assert "554 5.7.1" in replies
        assert "security.lists.spammers" in replies
        shot(b, "try")
    finally:
        console.stop()


class _Attacker(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        page = f"""<html><body><form id="f" method="post" action="{self.target}/section/general">
<input name="csrf" value="guess"><input name="general.max_recipients" value="1">
</form><script>document.getElementById("f").submit()</script></body></html>"""
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(120)
def test_a_cross_site_post_is_refused(
    browser: webdriver.Chrome, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(black=True))
    original = policy.read_bytes()
    cport = free_port()
    console = ConsoleProcess(
        ["--policy", str(policy), "--listen", f"127.0.0.1:{cport}"], tmp_path, cport
    )
    _Attacker.target = console.url
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    evil.daemon_threads = True
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        console.wait_listening()
        browser.get(f"{console.url}/section/general")  # the console's cookies are set
        browser.get(f"http://localhost:{evil.server_address[1]}/")
        wait_for(lambda: "refused" in browser.page_source)
        assert "cross-site" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(f"{console.url}/section/general")
        assert not browser.find_elements(By.ID, "pending")
        value = browser.find_element(By.ID, "general.max_recipients").get_attribute("value")
        assert value == "1000"
        assert policy.read_bytes() == original
    finally:
        evil.shutdown()
        console.stop()


def test_chromium_is_debians() -> None:
    # the browser tests use the system browser, never a downloaded one
    assert shutil.which("chromium") == CHROMIUM
