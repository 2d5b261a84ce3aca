"""PerfXChat in the browser: the page `perfxllm serve` serves at /, driven in a real headless Chromium (Debian's
/usr/bin/chromium, which `make setup-test` installs; Playwright never downloads a browser) against a real
`perfxllm serve` of the default model with an API key. Short greedy answers, to stay fast."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "webchat-key"
SHORT = {"system": "", "temperature": 0, "top_p": 1, "top_k": 0, "max_tokens": 8, "seed": None}
ANSWER_TIMEOUT_MS = 60_000
HOSTILE = (
    'Look: <script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=2"> **bold** `<b>b</b>`\n'
    "\n"
    "```html\n"
    "<script>window.__pwned=3</script>\n"
    "<img src=x onerror=window.__pwned=4>\n"
    "```\n"
    "[click](javascript:window.__pwned=5)"
)


@pytest.fixture(scope="module")
def server(spawn_server):
    server = spawn_server(api_key=API_KEY).wait_ready()  # no model argument: the default model
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    """A new browser profile (empty localStorage). The test fails on a script error on the page or on a request
    to anywhere but the server."""
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "request",
        lambda r: None if r.url.startswith((f"{server.url}/", "data:")) else elsewhere.append(r.url),
    )
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"
    assert not elsewhere, f"requests to other places than the server: {elsewhere}"


def returning_user(page: Page, settings: dict = SHORT, conversations: list | None = None) -> None:
    """What a returning user has in localStorage (the key, settings, maybe conversations), there before the
    page's script runs. Reloads keep whatever the page has saved since."""
    values = {"perfxchat.apiKey": API_KEY, "perfxchat.settings": settings}
    if conversations is not None:
        values["perfxchat.conversations"] = conversations
    page.add_init_script(
        f"for (const [k, v] of Object.entries({json.dumps(values)}))"
        " if (localStorage.getItem(k) === null) localStorage.setItem(k, JSON.stringify(v));"
    )


def ask(page: Page, text: str) -> Locator:
    """Sends a message; the answer's element."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    return page.locator(".msg.assistant").last


def finished(answer: Locator) -> Locator:
    meta = answer.locator(".meta")
    expect(meta).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    return meta


def stored(page: Page) -> list[dict]:
    return page.evaluate("JSON.parse(localStorage.getItem('perfxchat.conversations'))")


def test_the_page_and_its_files_need_no_key(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("static/chat.js", "static/chat.css"):
        assert f'"{path}"' in page.text
        r = httpx.get(f"{server.url}/{path}")
        assert r.status_code == 200 and len(r.text) > 1000
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    missing = httpx.get(f"{server.url}/static/missing.js")
    assert missing.status_code == 404 and "missing.js" in missing.json()["error"]["message"]


def test_asks_for_the_key_then_streams_an_answer(page, server):
    page.goto(server.url)
    expect(page.locator("#key-dialog")).to_be_visible()  # /v1/models answered 401
    page.fill("#key", "wrong-key")
    page.press("#key", "Enter")
    expect(page.locator("#key-message")).to_contain_text("refused")
    page.fill("#key", API_KEY)
    page.press("#key", "Enter")
    expect(page.locator("#key-dialog")).to_be_hidden()
    model = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]["id"]
    expect(page.locator("#model")).to_have_text(model)

    page.click("#open-settings")
    page.fill("[name=system]", "Answer in one sentence.")
    page.fill("[name=temperature]", "0")
    page.fill("[name=max_tokens]", "8")
    page.click("#settings-form [type=submit]")
    with page.expect_request("**/v1/chat/completions") as sent:
        answer = ask(page, "What is the capital of France?")
    meta = finished(answer)

    body = sent.value.post_data_json
    assert sent.value.header_value("authorization") == f"Bearer {API_KEY}"
    assert body["messages"] == [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert (body["stream"], body["stream_options"]) == (True, {"include_usage": True})
    assert (body["temperature"], body["max_tokens"]) == (0, 8)
    whole = server.post(
        "/v1/chat/completions", json={k: body[k] for k in ("messages", "temperature", "top_p", "max_tokens")}
    ).json()
    text = whole["choices"][0]["message"]["content"]
    assert stored(page)[0]["messages"][1]["content"] == text
    assert answer.locator(".body").inner_text().strip() == text.strip()
    expect(meta).to_contain_text(f"{whole['usage']['completion_tokens']} tokens")
    expect(meta).to_contain_text("tok/s")
    expect(meta).to_contain_text("TTFT")


def test_stop_aborts_the_answer_on_the_server(page, server):
    returning_user(page, {**SHORT, "max_tokens": 2000})
    page.goto(server.url)
    server.wait_idle()
    aborted = server.metric("perfxllm_requests_total", 'finish_reason="abort"')
    body = ask(page, "Tell me a long story about a dragon and a knight.").locator(".body")
    expect(body).not_to_have_text("", timeout=ANSWER_TIMEOUT_MS)
    first = body.text_content()
    assert server.metric("perfxllm_num_requests_running") == 1
    page.wait_for_function(
        "n => document.querySelector('.msg.assistant .body').textContent.length > n", arg=len(first)
    )  # streamed: more text arrives while the request runs
    expect(page.locator("#send")).to_be_hidden()

    page.click("#stop")
    expect(page.locator(".msg.assistant .meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    server.wait_idle(timeout=10)
    assert server.metric("perfxllm_requests_total", 'finish_reason="abort"') == aborted + 1
    text = body.text_content()
    time.sleep(0.5)
    assert body.text_content() == text
    assert stored(page)[0]["messages"][1]["content"].startswith(first)


def test_conversations_are_kept_across_reloads(page, server):
    returning_user(page)
    page.goto(server.url)
    answer = ask(page, "Say hello.")
    finished(answer)
    first = answer.locator(".body").text_content()
    page.click("#new-chat")
    finished(ask(page, "What is 2 plus 2?"))
    page.locator(".conversations li").first.locator(".rename").click()
    page.fill(".rename-input", "Arithmetic")
    page.press(".rename-input", "Enter")
    page.click("#theme")
    theme = page.evaluate("document.documentElement.dataset.theme")

    page.reload()
    titles = page.locator(".conversations .title")
    expect(titles).to_have_text(["Arithmetic", "Say hello."])
    expect(page.locator(".msg.user")).to_have_text(["What is 2 plus 2?"])
    assert page.evaluate("document.documentElement.dataset.theme") == theme
    titles.last.click()
    expect(page.locator(".msg.user")).to_have_text(["Say hello."])
    expect(page.locator(".msg.assistant .body")).to_have_text([first])

    page.once("dialog", lambda d: d.accept())
    page.locator(".conversations li").first.locator(".delete").click()
    page.reload()
    expect(titles).to_have_text(["Say hello."])
    assert [c["title"] for c in stored(page)] == ["Say hello."]


def test_model_text_is_shown_as_text_never_run(page, server):
    seeded = {
        "id": "x",
        "title": "<img src=x onerror=window.__pwned=6>",
        "messages": [
            {"role": "user", "content": "<img src=x onerror=window.__pwned=7>"},
            {"role": "assistant", "content": HOSTILE},
        ],
    }
    returning_user(page, conversations=[seeded])

    def streamed_reply(route: Route) -> None:  # the same text, streamed as the server would
        chunks = [HOSTILE[i : i + 7] for i in range(0, len(HOSTILE), 7)]
        events = [{"choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in chunks]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", streamed_reply)
    page.goto(server.url)
    finished(ask(page, "Repeat that."))

    expect(page.locator(".conversations .title")).to_have_text([seeded["title"]])
    expect(page.locator(".msg.user .body")).to_have_text([seeded["messages"][0]["content"], "Repeat that."])
    answers = page.locator(".msg.assistant")
    expect(answers).to_have_count(2)
    for answer in answers.all():
        assert answer.locator("script, img, b, a").count() == 0
        body = answer.locator(".body")
        expect(body).to_contain_text(
            '<script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=2">'
        )
        expect(body.locator("strong")).to_have_text("bold")
        expect(body.locator("p code")).to_have_text("<b>b</b>")
        expect(body.locator("pre code")).to_have_text(
            "<script>window.__pwned=3</script>\n<img src=x onerror=window.__pwned=4>"
        )
        expect(body).to_contain_text("[click](javascript:window.__pwned=5)")
    assert page.locator("#app img, #app script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_fits_a_phone_screen(page, server):
    long_line = "x = " + " + ".join(["1"] * 200)
    conversation = {
        "id": "p",
        "title": "Phone",
        "messages": [
            {"role": "user", "content": "A long line?"},
            {"role": "assistant", "content": f"```python\n{long_line}\n```\n" + "word " * 300},
        ],
    }
    returning_user(page, conversations=[conversation])
    page.set_viewport_size({"width": 390, "height": 760})
    page.goto(server.url)
    expect(page.locator(".msg.assistant pre")).to_be_visible()
    assert (
        page.evaluate("document.documentElement.scrollWidth") <= 390
    )  # the code block scrolls, not the page
    sidebar = page.locator(".sidebar")
    expect(sidebar).not_to_be_in_viewport()
    page.click("#menu")
    expect(sidebar).to_be_in_viewport()
    page.click("#scrim", position={"x": 370, "y": 400})
    expect(sidebar).not_to_be_in_viewport()
    expect(page.locator("#input")).to_be_in_viewport()
    expect(page.locator("#send")).to_be_in_viewport()
