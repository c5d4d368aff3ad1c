"""The chat page in headless Chromium (Debian's /usr/bin/chromium) driven by Playwright: a streamed reply,
reasoning folded, stop mid-reply, new chat, tokens/s, the markdown renderer's escaping, and no request
leaving the server. Skipped when Chromium or Playwright is missing (never `playwright install`).
"""

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import dsv4  # noqa: E402
from dsv4.server.app import create_app  # noqa: E402

MODEL = "tiny-v4"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    engine = dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)
    # ignore_eos: a random model may end a reply at once; the page needs replies long enough to stop
    app = create_app(engine, model_name=MODEL, max_context=1024, sampling_defaults={"ignore_eos": True})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.server.worker
    srv.should_exit = True
    thread.join(15)
    app.state.server.worker.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    page = browser.new_page()
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith(url):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url + "/")
    page.wait_for_function(f"document.getElementById('model').textContent === '{MODEL}'", timeout=WAIT_MS)
    yield page
    page.close()
    assert outside == [], f"the page asked for outside resources: {outside}"


def send(page, text: str, *, max_tokens: int, thinking: bool = False) -> None:
    if page.get_attribute("#settings", "open") is None:
        page.click("#settings summary")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.set_checked("#thinking", thinking)
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(worker, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while worker.scheduler.busy or worker.in_flight:
        assert time.monotonic() < end, "the server kept generating after the page stopped"
        time.sleep(0.05)


def test_streamed_reply_and_new_chat(page):
    send(page, "Hello", max_tokens=12)
    assert page.inner_text(".msg.user") == "Hello"
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=WAIT_MS)
    assert page.inner_text(".msg.assistant .content").strip()
    assert "error" not in page.get_attribute(".msg.assistant", "class")
    assert re.fullmatch(r"\d+(\.\d+)? tok/s", page.inner_text("#speed"))
    send(page, "And again", max_tokens=4)
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length === 2",
                           timeout=WAIT_MS)  # fmt: skip
    page.click("#new-chat")
    assert page.eval_on_selector("#messages", "el => el.children.length") == 0


def test_thinking_is_folded(page):
    send(page, "Think first", max_tokens=8, thinking=True)
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=WAIT_MS)
    details = page.query_selector(".msg.assistant details.reasoning")
    assert details.is_hidden() is False and details.get_attribute("open") is None
    assert page.eval_on_selector(".msg.assistant details.reasoning .md", "el => el.textContent.length") > 0


def test_stop_mid_reply(page, server):
    _, worker = server
    send(page, "Tell me a long story", max_tokens=900)
    page.wait_for_function("document.querySelector('.msg.assistant .content').textContent.length > 0",
                           timeout=WAIT_MS)  # fmt: skip
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=WAIT_MS)
    assert page.inner_text(".msg.assistant .note") == "[stopped]"
    assert not page.is_visible("#stop")
    wait_idle(worker)


def test_markdown_is_escaped_and_rendered(page):
    src = ("<img src=x onerror=alert(1)> **bold** and *it* `c<d>`\n\n```js\nlet a = '<b>';\n```\n"
           "- one\n- two\n\n1. first\n\n# Title <script>")  # fmt: skip
    html = page.evaluate("src => dsv4Markdown.render(src)", src)
    assert "<img" not in html and "<script" not in html and "&lt;img src=x" in html
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html and "<code>c&lt;d&gt;</code>" in html
    assert '<pre><code class="language-js">let a = &#39;&lt;b&gt;&#39;;</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert "<h1>Title &lt;script&gt;</h1>" in html
    unclosed = page.evaluate("() => dsv4Markdown.render('```\\npartial <code')")
    assert unclosed == "<pre><code>partial &lt;code</code></pre>"
