"""The playground page (GET /) in a real headless Chromium against a real server.

Needs Debian's ``chromium`` (``/usr/bin/chromium``, or ``CHARRNN_CHROMIUM``) and the
``playwright`` package (its wheel bundles the driver; no ``playwright install``). Without them
the browser tests skip and say why; the static-file check still runs."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from charrnn import load_checkpoint, save_checkpoint
from tests.conftest import CONTROLS, tiny_model
from tests.server import Server, run_server

CHROMIUM = Path(os.environ.get("CHARRNN_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LONG = 100_000  # a generation that cannot finish before Stop is pressed

# A server (the ``server`` fixture) and a browser each. The server's model is paced like the
# shipped one (~25,000 characters a second): the tiny test model writes several times faster
# than a browser can take in events, and would finish LONG before Stop is pressed.
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.e2e,
    pytest.mark.server(max_new_chars_limit=LONG, checkpoint="paced_checkpoint"),
]


@pytest.fixture(scope="module")
def paced_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """An untrained checkpoint over the tiny checkpoint's vocabulary, as large as the
    shipped model (2 x 512): its step takes what the shipped model's does."""
    vocab = load_checkpoint(tiny_checkpoint).vocab
    path = tmp_path_factory.mktemp("paced") / "paced.pt"
    save_checkpoint(path, tiny_model(vocab, hidden=512), vocab, {})
    return path


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install it with 'sudo apt-get install chromium' "
            "(Debian's package; .ci/run does this) or point CHARRNN_CHROMIUM at a Chromium binary"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the 'playwright' package is not installed (pip: .[dev])"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server: Server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    # /info has answered once the model list is filled and Generate is enabled.
    pg.wait_for_function("document.querySelector('#model').options.length > 0")
    pg.wait_for_function("!document.querySelector('#generate').disabled")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def generated_len(pg) -> int:
    return pg.evaluate("document.querySelector('#generated').textContent.length")


def set_params(pg, prime: str, length: int, seed: int | None = None, **numbers: str) -> None:
    pg.fill("#prime", prime)
    pg.fill("#max_new_chars", str(length))
    pg.fill("#seed", "" if seed is None else str(seed))
    for name, value in numbers.items():
        pg.fill(f"#{name}", value)


@pytest.mark.e2e
def test_page_and_static_files_are_served(server: Server):
    html = httpx.get(server.url + "/").text
    assert 'name="viewport"' in html
    assert "static/playground.js" in html and "static/playground.css" in html
    for name, kind in [("playground.js", "javascript"), ("playground.css", "text/css")]:
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
    assert httpx.get(f"{server.url}/static/nope.js").status_code == 404
    assert '<link rel="icon" href="static/favicon.svg"' in html
    icon = httpx.get(f"{server.url}/static/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg ")


@pytest.mark.e2e
@pytest.mark.browser
def test_generate_streams_and_shows_the_done_state(page, server: Server):
    page.wait_for_function("document.querySelector('#model-summary').textContent.includes('tiny')")
    assert page.input_value("#model") == "tiny"
    prime = "Alice said "
    set_params(page, prime, 150, seed=7, temperature="0.7", top_k="20", top_p="0.9")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#generated').textContent.length >= 100")
    page.wait_for_selector("#state[data-state='done']")

    shown = page.text_content("#generated")
    assert page.text_content("#prime-echo") == prime
    assert page.text_content("#stat-finish") == "length"
    assert page.text_content("#stat-chars") == "150"
    assert page.text_content("#stat-seed") == "7"
    assert float(page.text_content("#stat-rate").replace(",", "")) > 0
    # The page sent exactly what was typed: the server gives the same text for that request.
    body = {
        "prime": prime,
        "max_new_chars": 150,
        "seed": 7,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
    }
    expected = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()
    assert shown == expected["generated_text"]
    assert page.is_disabled("#stop") and page.is_enabled("#generate")

    # "reuse" puts the seed back; a server-picked seed (up to 2**63) is shown exactly.
    page.fill("#seed", "")
    page.click("#generate")
    page.wait_for_selector("#state[data-state='done']")
    seed = page.text_content("#stat-seed")
    assert seed.isdigit()
    page.click("#reuse-seed")
    assert page.input_value("#seed") == seed


@pytest.mark.e2e
@pytest.mark.browser
def test_stop_cancels_the_stream_and_frees_the_row(page, server: Server):
    before = server.metric("charrnn_generated_characters_total", model="tiny")
    set_params(page, "The Queen ", LONG)
    page.click("#generate")
    page.wait_for_selector("#state[data-state='streaming']")
    page.wait_for_function("document.querySelector('#generated').textContent.length >= 200")
    first = generated_len(page)
    page.wait_for_function(f"document.querySelector('#generated').textContent.length > {first}")
    assert server.metric("charrnn_active_generations", model="tiny") == 1
    assert page.is_enabled("#stop")

    page.click("#stop")
    page.wait_for_selector("#state[data-state='stopped']")
    deadline = time.monotonic() + 10
    while server.metric("charrnn_active_generations", model="tiny") != 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.05)
    shown = generated_len(page)
    page.wait_for_timeout(300)
    assert generated_len(page) == shown, "text kept arriving after Stop"
    assert 200 <= shown < LONG
    generated = server.metric("charrnn_generated_characters_total", model="tiny") - before
    assert generated < LONG, "the generation ran to the end instead of being cancelled"
    assert page.text_content("#stat-finish") == "stopped"
    assert page.is_enabled("#generate") and page.is_disabled("#stop")


@pytest.mark.e2e
@pytest.mark.browser
def test_unknown_characters_are_marked_and_the_server_message_shown(page, server: Server):
    prime = "Alice ☃ was"
    page.fill("#prime", prime)
    warning = page.locator("#prime-warning")
    warning.wait_for(state="visible")
    assert "'☃' at position 6" in warning.text_content()
    assert page.is_enabled("#generate")  # the check warns; the server has the last word

    page.click("#generate")
    page.wait_for_selector("#state[data-state='rejected']")
    r = httpx.post(f"{server.url}/generate", json={"prime": prime})
    assert r.status_code == 422
    message = r.json()["detail"][0]["msg"]
    error = page.locator("#prime-error")
    assert error.is_visible()
    assert error.text_content() == message
    assert page.get_attribute("#prime", "aria-invalid") == "true"
    assert generated_len(page) == 0

    # Fixing the prime clears the warning, and the next run clears the error.
    page.fill("#prime", "Alice was")
    warning.wait_for(state="hidden")
    page.fill("#max_new_chars", "20")
    page.click("#generate")
    page.wait_for_selector("#state[data-state='done']")
    assert not error.is_visible()


@pytest.mark.e2e
@pytest.mark.browser
def test_other_validation_errors_show_under_their_field(page):
    set_params(page, "Alice", 20, top_k="1000")
    page.click("#generate")
    page.wait_for_selector("#state[data-state='rejected']")
    assert page.text_content("#params-error").startswith("Top-k: ")
    assert "vocabulary size" in page.text_content("#params-error")
    assert page.is_visible("#params-error")
    assert page.get_attribute("#top_k", "aria-invalid") == "true"


@pytest.mark.e2e
@pytest.mark.browser
def test_phone_layout_fits_the_screen(browser, server: Server):
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    try:
        pg = context.new_page()
        pg.goto(server.url + "/")
        pg.wait_for_function("!document.querySelector('#generate').disabled")
        overflow = pg.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "the page scrolls sideways on a phone"
        # Controls come first, then the output, in one column.
        controls = pg.locator("#controls").bounding_box()
        output = pg.locator(".output").bounding_box()
        assert output["y"] >= controls["y"] + controls["height"]
        assert output["width"] <= 390
    finally:
        context.close()


@pytest.mark.e2e
@pytest.mark.browser
def test_api_key_field_when_keys_are_configured(browser, tiny_checkpoint: Path, tmp_path: Path):
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", api_keys="sesame") as server:
        context = browser.new_context()
        try:
            pg = context.new_page()
            pg.set_default_timeout(20_000)
            pg.goto(server.url + "/")
            pg.wait_for_function("!document.querySelector('#generate').disabled")
            assert pg.is_visible("#api-key")
            set_params(pg, "Alice", 30)
            pg.click("#generate")
            pg.wait_for_selector("#state[data-state='rejected']")
            assert "API key" in pg.text_content("#error")
            pg.fill("#api-key", "sesame")
            pg.click("#generate")
            pg.wait_for_selector("#state[data-state='done']")
            assert generated_len(pg) == 30 and not pg.is_visible("#error")
        finally:
            context.close()


# -- probabilities ----------------------------------------------------------------------------


def _alice_was(server: Server) -> dict:
    """The reference answer for the colouring tests' run (seed 11), with its logprobs."""
    body = {"prime": "Alice was", "max_new_chars": 120, "seed": 11, "temperature": 0.8}
    return httpx.post(f"{server.url}/generate", json={**body, "logprobs": 5}, timeout=30).json()


@pytest.mark.e2e
def test_colouring_by_probability_with_alternatives_by_keyboard(page, server: Server):
    """With the toggle on, every generated character is a shaded span; its logprob is the
    server's; focusing one with the arrow keys (or hovering it) shows its alternatives."""
    set_params(page, "Alice was", 120, seed=11)
    page.check("#colour")
    page.click("#generate")
    page.wait_for_selector("#state[data-state='done']")
    page.wait_for_selector("#legend:not([hidden])")
    text = page.evaluate("document.querySelector('#generated').textContent")
    assert page.locator("#generated .tok").count() == len(text) == 120
    want = _alice_was(server)
    assert text == want["generated_text"]
    shades = page.evaluate(
        "[...document.querySelectorAll('#generated .tok')].map(s => s.className)"
    )
    expected = [
        f"tok s{min(5, int(-lp / 0.6931471805599453))}" for lp in want["logprobs"]["token_logprobs"]
    ]
    assert shades == expected
    bits = -sum(want["logprobs"]["token_logprobs"]) / 120 / 0.6931471805599453
    assert page.text_content("#stat-bpc") == f"{bits:.3f}"
    # Keyboard: focus the output, move to the third character.
    page.focus("#text")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.i") == "2"
    page.wait_for_selector("#alts:not([hidden])")
    alts = page.text_content("#alts")
    first_alt = want["logprobs"]["top_logprobs"][2][0]["text"]
    assert repr(text[2]) in alts and repr(first_alt) in alts
    page.keyboard.press("Escape")
    page.wait_for_selector("#alts", state="hidden")
    # Hovering shows them too.
    page.hover("#generated .tok >> nth=10")
    page.wait_for_selector("#alts:not([hidden])")
    assert repr(text[10]) in page.text_content("#alts")


@pytest.mark.e2e
def test_score_mode_colours_a_pasted_text(page, server: Server):
    sample = "The queen said to the rabbit."
    page.click("#score-box summary")
    page.fill("#score-text", sample)
    page.click("#score")
    page.wait_for_selector("#state[data-state='scored']")
    want = httpx.post(f"{server.url}/score", json={"text": sample}, timeout=30).json()
    assert page.text_content("#stat-bpc") == f"{want['bpc']:.3f}"
    assert page.locator("#generated .tok").count() == len(sample)
    assert page.locator("#generated .tok.none").count() == 1  # the first: nothing before it
    page.fill("#score-text", "Al\u2603ce")
    page.click("#score")
    page.wait_for_selector("#state[data-state='rejected']")
    assert "\u2603" in page.text_content("#error") or "2603" in page.text_content("#error")


def test_colouring_after_a_plain_run_colours_the_text_there(page, server: Server):
    """Ticking the toggle after a generation made without it scores that text (the prime as
    context) and shades it as a coloured run would have; unticking shows it plain again."""
    set_params(page, "Alice was", 120, seed=11)
    page.click("#generate")
    page.wait_for_selector("#state[data-state='done']")
    text = page.text_content("#generated")
    assert page.locator("#generated .tok").count() == 0
    page.check("#colour")
    page.wait_for_selector("#legend:not([hidden])")
    page.wait_for_selector("#state[data-state='done']")  # back to where it was
    assert page.text_content("#generated") == text
    assert page.locator("#generated .tok").count() == 120
    want = _alice_was(server)
    assert want["generated_text"] == text
    logprobs = want["logprobs"]["token_logprobs"]
    shades = page.evaluate(
        "[...document.querySelectorAll('#generated .tok')].map(s => s.className)"
    )
    assert shades == [f"tok s{min(5, int(-lp / 0.6931471805599453))}" for lp in logprobs]
    bits = -sum(logprobs) / 120 / 0.6931471805599453
    assert page.text_content("#stat-bpc") == f"{bits:.3f}"
    page.hover("#generated .tok >> nth=5")
    page.wait_for_selector("#alts:not([hidden])")
    assert repr(text[5]) in page.text_content("#alts")

    page.uncheck("#colour")
    page.wait_for_selector("#legend", state="hidden")
    assert page.locator("#generated .tok").count() == 0
    assert page.text_content("#generated") == text


CONTRAST = """() => {
  // WCAG 2 contrast ratio of each shade's text on its background, as the page renders them.
  const lum = (css) => {
    const [r, g, b] = css.match(/[\\d.]+/g).slice(0, 3).map((v) => {
      const c = Number(v) / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const out = {};
  for (let i = 0; i < 6; i++) {
    const span = document.createElement("span");
    span.className = `tok s${i}`;
    span.textContent = "a";
    document.querySelector("#generated").append(span);
    const style = getComputedStyle(span);
    const [hi, lo] = [lum(style.color), lum(style.backgroundColor)].sort((a, b) => b - a);
    out[`s${i}`] = (hi + 0.05) / (lo + 0.05);
    span.remove();
  }
  return out;
}"""


@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_shade_is_readable(browser, server: Server, scheme: str):
    context = browser.new_context(color_scheme=scheme)
    try:
        pg = context.new_page()
        pg.goto(server.url + "/")
        ratios = pg.evaluate(CONTRAST)
        assert len(ratios) == 6
        low = {shade: round(r, 2) for shade, r in ratios.items() if r < 4.5}
        assert not low, f"shades under WCAG AA's 4.5:1 contrast: {low}"
    finally:
        context.close()


@pytest.mark.browser
def test_the_stats_share_one_row_and_the_seed_does_not_wrap(page):
    """All seven stats (characters, speed, first character, time, finish, match, seed) on one
    row of a desktop window, the 19-digit seed on one line."""
    seed = str(2**63 - 1)  # the largest seed: 19 digits
    set_params(page, "Alice", 20, seed=int(seed))
    page.click("#generate")
    page.wait_for_selector("#state[data-state='done']")
    assert page.text_content("#stat-seed") == seed
    boxes = page.evaluate(
        "[...document.querySelectorAll('.stats > div')].map(d => d.getBoundingClientRect().top)"
    )
    assert len(boxes) == 7 and max(boxes) - min(boxes) < 1, boxes
    heights = page.evaluate(
        "['#stat-chars', '#stat-seed'].map(s => document.querySelector(s)"
        ".closest('dd').getBoundingClientRect().height)"
    )
    assert heights[1] == pytest.approx(heights[0], abs=1), "the seed wraps onto a second line"


@pytest.mark.browser
def test_loading_the_page_requests_nothing_missing(browser, server: Server):
    """No 404 on load: the favicon is linked and served."""
    context = browser.new_context()
    try:
        pg = context.new_page()
        failed: list[str] = []
        pg.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else 0)
        pg.goto(server.url + "/")
        pg.wait_for_function("!document.querySelector('#generate').disabled")
        icon = pg.evaluate("document.querySelector('link[rel=icon]').href")
        assert httpx.get(icon).status_code == 200
        pg.wait_for_timeout(300)
        assert not failed, failed
    finally:
        context.close()


@pytest.mark.e2e
@pytest.mark.browser
def test_a_constraint_holds_the_text_and_its_compile_error_shows_inline(page):
    page.select_option("#constraint-example", "name")  # fills the kind, the pattern, a prime
    assert page.input_value("#constraint-kind") == "regex"
    assert page.input_value("#constraint") == "[A-Z][a-z]{3,9}(ia|or|wen)"
    page.select_option("#constraint-kind", "regex")
    page.fill("#constraint", "[a-")
    page.click("#generate")
    page.wait_for_selector("#constraint-error:not([hidden])")
    assert "does not compile" in page.text_content("#constraint-error")
    page.fill("#constraint", "[a-z]+( [a-z]+)?")
    set_params(page, "the ", 80, seed=3)
    page.click("#generate")
    page.wait_for_selector("#state[data-state='done']")
    assert page.is_hidden("#constraint-error")
    text = page.text_content("#generated")
    assert re.fullmatch("[a-z]+( [a-z]+)?", text), text
    assert page.text_content("#stat-finish") == "stop"
    assert page.text_content("#stat-match") == "complete"


# -- samples and more controls ----------------------------------------------------------------

# The "More controls" fields are the contract's controls (CONTROLS): none is sent while it
# holds its default.


def generate_and_capture(pg) -> dict:
    """Press Generate and return the JSON body of the request the page made."""
    with pg.expect_request(lambda r: r.url.endswith("/generate/stream")) as req:
        pg.click("#generate")
    return req.value.post_data_json


def sample_texts(pg) -> list[str]:
    return pg.evaluate(
        "[...document.querySelectorAll('#samples .sample-gen')].map(e => e.textContent)"
    )


@pytest.mark.e2e
@pytest.mark.browser
def test_samples_stream_together_and_equal_the_json_answer(page, server: Server):
    """Samples 3: one request with n 3; three entries, each its seed and, once done, its
    score, their texts those of POST /generate with n 3 and the same seed."""
    set_params(page, "Alice was", 60, seed=5)
    page.fill("#n", "3")
    sent = generate_and_capture(page)
    page.wait_for_selector("#state[data-state='done']")
    assert sent["n"] == 3 and sent["seed"] == 5 and not CONTROLS & sent.keys()
    assert page.locator("#samples .sample").count() == 3
    assert page.is_hidden("#caret") and page.text_content("#generated") == ""
    body = {"prime": "Alice was", "max_new_chars": 60, "seed": 5, "temperature": 0.8, "n": 3}
    want = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()["samples"]
    assert sample_texts(page) == [s["generated_text"] for s in want]
    for i, s in enumerate(want):
        head = page.text_content(f"#samples .sample >> nth={i} >> .sample-head")
        assert f"Sample {i + 1}" in head and f"seed {5 + i}" in head and "length" in head
        score = re.search(r"score (-?\d+\.\d{3})", head)
        assert score and float(score[1]) == pytest.approx(s["score"], abs=1e-3), head
    assert page.text_content("#stat-chars") == "180"
    assert page.text_content("#stat-seed") == "5"

    # They fill in together: every entry grows while the stream runs; Stop ends them all.
    set_params(page, "The Queen ", LONG, seed=9)
    page.click("#generate")
    page.wait_for_function(
        "[...document.querySelectorAll('#samples .sample-gen')].every(e => e.textContent.length"
        " >= 40) && document.querySelector('#state').dataset.state === 'streaming'"
    )
    assert page.text_content("#samples .sample >> nth=2 >> .sample-seed") == "seed 11"
    page.click("#stop")
    page.wait_for_selector("#state[data-state='stopped']")
    assert all(40 <= len(t) < LONG for t in sample_texts(page))

    # Back to one: the single text box again, and no n on the request.
    set_params(page, "Alice was", 20, seed=5)
    page.fill("#n", "1")
    sent = generate_and_capture(page)
    page.wait_for_selector("#state[data-state='done']")
    assert "n" not in sent and page.is_hidden("#samples")
    assert page.text_content("#generated") == want[0]["generated_text"][:20]


@pytest.mark.e2e
@pytest.mark.browser
def test_more_controls_are_closed_and_only_changed_fields_are_sent(page, server: Server):
    more = page.locator("#more")
    assert more.get_attribute("open") is None and page.is_hidden("#presence_penalty")
    page.click("#more summary")
    assert page.is_visible("#presence_penalty") and page.is_visible("#banned_strings")
    page.fill("#presence_penalty", "0.5")
    page.fill("#banned_strings", "the queen\n\nsaid\\nAlice")  # \n: a newline
    page.fill("#repetition_penalty", "1.0")  # its default, as typed otherwise: not sent
    assert page.text_content("#more-count") == "(2 set)"
    page.click("#more summary")  # closed again: the values stay and are sent
    set_params(page, "Alice was", 80, seed=21)
    sent = generate_and_capture(page)
    page.wait_for_selector("#state[data-state='done']")
    assert sent["presence_penalty"] == 0.5
    assert sent["banned_strings"] == ["the queen", "said\nAlice"]
    assert CONTROLS & sent.keys() == {"presence_penalty", "banned_strings"}
    # The page shows the stream the server makes of that request.
    want = httpx.post(f"{server.url}/generate", json=sent, timeout=30).json()
    assert page.text_content("#generated") == want["generated_text"]
    assert page.text_content("#stat-finish") == want["finish_reason"]


@pytest.mark.e2e
@pytest.mark.browser
def test_a_malformed_logit_bias_shows_inline_and_sends_nothing(page):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/generate" in r.url else None)
    page.click("#more summary")
    page.fill("#logit_bias", "e=-2, qq=3")
    assert page.text_content("#more-count") == "(a logit bias to fix)"
    page.click("#more summary")  # closed: the message opens it
    page.click("#generate")
    error = page.locator("#logit_bias-error")
    error.wait_for(state="visible")
    assert error.text_content().startswith('"qq=3" is not a char=value pair')
    assert page.locator("#more").get_attribute("open") is not None
    assert page.get_attribute("#logit_bias", "aria-invalid") == "true"
    assert page.get_attribute("#state", "data-state") == "idle"
    # So is Samples outside 1 to 8.
    page.fill("#logit_bias", "")
    page.fill("#n", "9")
    page.click("#generate")
    page.wait_for_selector("#params-error:not([hidden])")
    assert page.text_content("#params-error") == "Samples: a whole number from 1 to 8"
    page.wait_for_timeout(300)
    assert requests == [], "the page sent a request it should have refused"

    # Fixed, the pairs go as an object, a quoted key included.
    page.fill("#n", "1")
    page.fill("#logit_bias", 'e=-2, q=3 " "=-1.5')
    set_params(page, "Alice was", 30, seed=4)
    sent = generate_and_capture(page)
    page.wait_for_selector("#state[data-state='done']")
    assert sent["logit_bias"] == {"e": -2, "q": 3, " ": -1.5}
    assert page.is_hidden("#logit_bias-error") and page.is_hidden("#params-error")


@pytest.mark.e2e
@pytest.mark.browser
def test_a_control_the_server_refuses_shows_its_message(page, server: Server):
    page.click("#more summary")
    page.fill("#dry_base", "1")  # the server's bound is exclusive: above 1
    page.click("#more summary")
    set_params(page, "Alice was", 30)
    sent = generate_and_capture(page)
    page.wait_for_selector("#state[data-state='rejected']")
    assert sent["dry_base"] == 1
    r = httpx.post(f"{server.url}/generate", json=sent, timeout=30)
    assert r.status_code == 422
    message = next(d["msg"] for d in r.json()["detail"] if d["loc"][-1] == "dry_base")
    box = page.locator("#more-error")
    assert box.is_visible() and box.text_content() == f"DRY base: {message}"
    assert page.get_attribute("#dry_base", "aria-invalid") == "true"
    assert page.locator("#more").get_attribute("open") is not None  # opened to show it
    assert generated_len(page) == 0

    # A logit bias the server refuses: a value out of range, a key not in the vocabulary.
    page.fill("#dry_base", "1.75")
    page.fill("#logit_bias", "Q=150, \u00e9=1")
    sent = generate_and_capture(page)
    page.wait_for_selector("#state[data-state='rejected']")
    assert sent["logit_bias"] == {"Q": 150, "\u00e9": 1} and "dry_base" not in sent
    detail = httpx.post(f"{server.url}/generate", json=sent, timeout=30).json()["detail"]
    msgs = {d["loc"][-1]: d["msg"] for d in detail}
    lines = page.eval_on_selector_all("#logit_bias-error > div", "ds => ds.map(d => d.textContent)")
    assert lines == [f'"Q": {msgs["Q"]}', msgs["\u00e9"]]  # that one quotes its key itself
    assert page.is_hidden("#more-error")
