"""The web page at ``/``, driven in a real headless Chromium against the app on uvicorn and the tiny engine.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``make test``); without it these tests fail.
"""

from __future__ import annotations

import datetime
import http.client
import re
import time

import httpx
import pytest
from browser import Cable, launch, serve
from conftest import FIXTURES, TEST_AUDIO
from playwright.sync_api import Page, expect, sync_playwright
from pydantic import SecretStr

TIMEOUT_MS = 120_000  # a generation on 2 busy CPU cores; the page shows audio long before
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def web_settings(settings, tmp_path_factory):
    """The shared test settings with a voice library of this module's own."""
    return settings.model_copy(update={"voices_dir": tmp_path_factory.mktemp("web-voices")})


@pytest.fixture(scope="module")
def base_url(web_settings, engine, recognizer):
    """The app, on uvicorn on a loopback port."""
    from app import create_app

    with serve(create_app(web_settings, engine=engine, recognizer=recognizer)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium."""
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


class Console:
    """What the page logged as errors, and what it threw."""

    def __init__(self, page: Page):
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    @property
    def uncaught(self) -> list[str]:
        return [e for e in self.errors if e.startswith("uncaught")]

    @property
    def refused(self) -> list[str]:
        """What the page's Content-Security-Policy stopped (the browser logs each as an error)."""
        return [e for e in self.errors if "Content Security Policy" in e]


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage) at desktop width."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.console = Console(page)
    yield page
    assert not page.console.uncaught, page.console.uncaught
    assert not page.console.refused, page.console.refused  # the page's own policy allows what it does
    context.close()


def open_page(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#status")).to_have_text("Ready")
    expect(page.locator("#voice option[value=alloy]")).to_have_count(1)


def store_voice(url: str, name: str, headers: dict | None = None) -> None:
    with open(TEST_AUDIO, "rb") as clip:
        response = httpx.post(
            f"{url}/v1/audio/voices",
            data={
                "name": name,
                "transcript": "We need to finish the report before the meeting on Friday morning.",
            },
            files={"audio_sample": ("ref.wav", clip, "audio/wav")},
            headers=headers,
            timeout=120,
        )
    assert response.status_code == 200, response.text


def api_voices(url: str, headers: dict | None = None) -> list[str]:
    response = httpx.get(f"{url}/v1/audio/voices", headers=headers)
    assert response.status_code == 200
    return [v["name"] for v in response.json()["data"]]


def speak(page: Page, text: str, voice: str, fmt: str = "mp3") -> None:
    """Type, choose, press Speak, and wait until the finished file is offered."""
    page.fill("#text", text)
    page.select_option("#voice", voice)
    if voice != ":clip":
        page.select_option("#format", fmt)
    page.click("#speak")
    expect(page.locator("#download")).to_be_visible()


def download_head(page: Page, count: int = 4) -> bytes:
    """The first bytes of the file the Download link offers."""
    values = page.evaluate(
        """async (n) => {
            const blob = await (await fetch(document.getElementById('download').href)).blob();
            return [...new Uint8Array(await blob.slice(0, n).arrayBuffer())];
        }""",
        count,
    )
    return bytes(values)


def test_page_loads_without_console_errors_and_shows_the_apis_limit(page, base_url):
    open_page(page, base_url)
    schema = httpx.get(f"{base_url}/openapi.json").json()
    limit = schema["components"]["schemas"]["SpeechRequest"]["properties"]["input"]["maxLength"]
    expect(page.locator("#count")).to_have_text(f"0 / {limit}")
    page.fill("#text", "Hello")
    expect(page.locator("#count")).to_have_text(f"5 / {limit}")
    # characters as the API counts them (an emoji is one; JavaScript's length and maxlength say two)
    page.fill("#text", "Hi \U0001f600\U0001f600")
    expect(page.locator("#count")).to_have_text(f"5 / {limit}")
    page.fill("#text", "Vie\u0323\u0302t")  # composed, as the API counts it: "Việt", 4 characters, not 6
    expect(page.locator("#count")).to_have_text(f"4 / {limit}")
    page.wait_for_load_state("networkidle")
    assert page.console.errors == []
    # Its own scripts, styles and this server only (every test's page is checked for what it refused).
    policy = httpx.get(f"{base_url}/").headers["content-security-policy"]
    assert policy.startswith("default-src 'self';") and "frame-ancestors 'none'" in policy
    # the page's files are served with their types; anything else under /web/ is a 404 in the envelope
    assert httpx.get(f"{base_url}/web/app.js").headers["content-type"].startswith("text/javascript")
    missing = httpx.get(f"{base_url}/web/..%2Fapp.py")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_the_setting_turns_the_page_off(web_settings, engine, recognizer):
    from fastapi.testclient import TestClient

    from app import create_app

    off = create_app(web_settings.model_copy(update={"web_ui": False}), engine=engine, recognizer=recognizer)
    with TestClient(off) as client:
        assert client.get("/").status_code == 404
        assert client.get("/web/app.js").status_code == 404
        assert client.get("/health").status_code == 200


def test_lists_the_voices_the_api_holds(page, base_url):
    store_voice(base_url, "listed-voice")
    open_page(page, base_url)
    expect(page.locator("#voices li")).to_have_count(len(api_voices(base_url)))  # the list has loaded
    shown = page.locator("#voices li").evaluate_all("items => items.map(i => i.dataset.voice)")
    assert shown == api_voices(base_url)
    assert "listed-voice" in shown
    expect(page.locator("#voice option[value='listed-voice']")).to_have_count(1)


def test_speaking_plays_in_the_audio_element_while_it_streams(page, base_url):
    open_page(page, base_url)
    # when the <audio> element starts playing, and when the finished file is offered (the stream ended)
    page.evaluate(
        """() => {
            window.seen = {};
            const audio = document.getElementById('player');
            const download = document.getElementById('download');
            audio.addEventListener('playing', () => (seen.playing ??= performance.now()));
            new MutationObserver(() => download.hidden || (seen.done ??= performance.now()))
                .observe(download, {attributes: true, attributeFilter: ['hidden']});
        }"""
    )
    speak(page, "Hello there, this is the web page speaking.", "default", "mp3")
    seen = page.evaluate("() => window.seen")
    assert seen["playing"] < seen["done"], "the audio began only after the whole stream had arrived"
    page.wait_for_function("() => document.getElementById('player').currentTime > 0.5")
    audio = page.evaluate(
        """() => { const a = document.getElementById('player');
                   return {duration: a.duration, played: a.played.length ? a.played.end(0) : 0,
                           state: a.dataset.state}; }"""
    )
    assert audio["duration"] > 0.5 and audio["played"] > 0.5 and audio["state"] == "done"
    head = download_head(page, 3)
    assert head == b"ID3" or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # an mp3
    assert page.locator("#download").get_attribute("download") == "speech.mp3"


def test_wav_plays_as_it_streams_and_downloads_a_wav(page, base_url):
    open_page(page, base_url)
    speak(page, "A second sentence, as a wave file.", "default", "wav")
    assert download_head(page, 4) == b"RIFF"
    page.wait_for_function("() => document.getElementById('player').duration > 0.5")
    assert "first audio after" in page.locator("#speak-status").inner_text()


def test_a_format_that_plays_when_complete_says_so_while_it_arrives(page, base_url):
    open_page(page, base_url)
    speak(page, "First a wave file.", "default", "wav")
    page.fill("#text", "Then an opus file.")
    page.select_option("#format", "opus")
    page.click("#speak")
    status = page.locator("#speak-status")
    expect(status).to_contain_text("opus plays when it is complete")
    assert "Playing" not in status.inner_text()
    # the player forgot the wave file at once: no old length or position shown while opus arrives
    assert page.evaluate("() => isNaN(document.getElementById('player').duration)")
    expect(page.locator("#download")).to_be_visible()
    expect(status).to_contain_text("Done in")


def test_stop_ends_the_generation_on_the_server(page, web_settings, engine, recognizer):
    """Stop while audio plays: the page says so and offers nothing, and the server's slot is free soon,
    long before the speech would have reached its cap (the tiny model's audio never ends by itself)."""
    from app import create_app

    settings = web_settings.model_copy(update={"max_audio_seconds": 60})
    with serve(create_app(settings, engine=engine, recognizer=recognizer)) as url:
        open_page(page, url)
        stop_while_playing(page, engine)


def stop_while_playing(page: Page, engine) -> None:
    page.fill("#text", "A long answer that nobody will wait for. " * 4)  # a cap of 29 s: 741 steps
    page.select_option("#voice", "default")
    page.select_option("#format", "mp3")
    before = engine.steps
    page.click("#speak")
    expect(page.locator("#speak-status")).to_contain_text("Playing while")
    expect(page.locator("#stop")).to_be_focused()
    page.click("#stop")
    expect(page.locator("#speak-status")).to_have_text("Stopped.")
    expect(page.locator("#speak")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#download")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    deadline = time.monotonic() + 10
    while (engine.pending or engine.stats().busy_slots) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (engine.pending, engine.stats().busy_slots) == (0, 0)
    assert engine.steps - before < 300  # well short of the cap


def test_storing_a_voice_from_an_uploaded_file_lists_plays_and_deletes_it(page, base_url):
    open_page(page, base_url)
    page.set_input_files("#clip-file", str(FIXTURES / "speech_female.wav"))
    expect(page.locator("#clip-info")).to_contain_text("speech_female.wav")
    page.fill("#voice-name", "uploaded")
    page.check("#consent")
    page.click("#store")  # no transcript given: the server recognises it
    item = page.locator("#voices li[data-voice='uploaded']")
    expect(item).to_be_visible()
    assert "uploaded" in api_voices(base_url)
    expect(page.locator("#voice")).to_have_value("uploaded")
    # the form is cleared (pressing Store again asked for a 409); the clip stays, to clone or transcribe
    expect(page.locator("#voice-name")).to_have_value("")
    expect(page.locator("#consent")).not_to_be_checked()
    expect(page.locator("#clip-info")).to_contain_text("speech_female.wav")

    item.get_by_role("button", name="Play the sample of uploaded").click()
    page.wait_for_function("() => document.getElementById('sample-player').currentTime > 0")
    duration = page.evaluate("() => document.getElementById('sample-player').duration")
    voice = httpx.get(f"{base_url}/v1/audio/voices/uploaded").json()
    assert duration == pytest.approx(voice["duration"], abs=0.05)

    item.get_by_role("button", name="Delete uploaded").click()
    confirm = item.get_by_role("button", name="Confirm: delete uploaded")  # what a screen reader hears
    expect(confirm).to_have_text("Confirm delete")
    assert "uploaded" in api_voices(base_url)  # the first press only asks
    confirm.click()
    expect(page.locator("#voices li[data-voice='uploaded']")).to_have_count(0)
    assert "uploaded" not in api_voices(base_url)
    # it was the selected voice: the page says which one speaks now
    expect(page.locator("#voice")).to_have_value("alloy")
    expect(page.locator("#speak-status")).to_have_text("Deleted the voice uploaded; the voice is now alloy.")
    # the library's live region, which said "Press again to delete", says it too
    expect(page.locator("#library-status")).to_have_text(
        "Deleted the voice uploaded; the voice is now alloy."
    )


def test_a_double_click_on_delete_only_asks(page, base_url):
    """Delete asks first and deletes at the second press: a double click (a habit on desktops) was both
    presses, and deleted the voice unasked. Its second click now never confirms."""
    store_voice(base_url, "doubled")
    open_page(page, base_url)
    item = page.locator("#voices li[data-voice='doubled']")
    item.get_by_role("button", name="Delete doubled").dblclick()
    confirm = item.get_by_role("button", name="Confirm: delete doubled")
    expect(confirm).to_have_text("Confirm delete")
    page.wait_for_timeout(500)
    assert "doubled" in api_voices(base_url)
    confirm.click()
    expect(item).to_have_count(0)
    assert "doubled" not in api_voices(base_url)


def test_a_delete_that_failed_can_be_pressed_again(page, base_url):
    """A delete that failed leaves its button asking again, not ignoring presses as it does while the delete
    is on its way. One that failed because the voice was deleted elsewhere meanwhile takes it off the page."""
    store_voice(base_url, "gone")
    open_page(page, base_url)
    item = page.locator("#voices li[data-voice='gone']")

    def refuse(route):
        body = {"error": {"message": "the disk is full", "type": "server_error", "param": None, "code": None}}
        route.fulfill(status=500, json=body)

    deletes = re.compile(r"/v1/audio/voices/[^/]+$")  # (by the voice's id)
    page.route(
        deletes, lambda route: refuse(route) if route.request.method == "DELETE" else route.continue_()
    )
    item.get_by_role("button", name="Delete gone").click()
    item.get_by_role("button", name="Confirm: delete gone").click()
    expect(page.get_by_role("alert")).to_contain_text("the disk is full")
    button = item.locator("button", has_text="Delete")
    expect(button).to_have_text("Delete")
    button.click()
    expect(button).to_have_text("Confirm delete")
    page.unroute(deletes)

    assert httpx.delete(f"{base_url}/v1/audio/voices/gone").status_code == 200  # deleted elsewhere
    item.get_by_role("button", name="Confirm: delete gone").click()
    # by its name, not the id the page asked with (a trial: "no voice 'voice_bd9c484ba6af017a1c39'")
    expect(page.get_by_role("alert")).to_contain_text("The voice “gone” is not in the library any more")
    expect(item).to_have_count(0)  # the list follows the library
    expect(page.locator("#voice option[value='gone']")).to_have_count(0)
    expect(page.locator("#refresh")).to_be_focused()  # where the keyboard goes when its voice went


def test_the_library_keeps_the_focus_and_says_what_its_buttons_did(page, base_url):
    """An accessibility audit: the library was built again under the keyboard (after speaking with an OpenAI
    name, or when the pill turned Ready), dropping the focus; "Use" was named "Speak with ..."; arming
    Delete changed only the focused button's name, which screen readers may not announce."""
    store_voice(base_url, "kept")
    open_page(page, base_url)
    item = page.locator("#voices li[data-voice='kept']")
    expect(item).to_be_visible()  # the list has loaded
    for use in page.locator("#voices").get_by_text("Use", exact=True).all():
        assert use.get_attribute("aria-label").startswith("Use "), use.get_attribute("aria-label")

    # The voices loaded again (Refresh pressed from a script: the focus is not moved by a click)
    play = item.get_by_role("button", name="Play the sample of kept")
    play.focus()
    page.evaluate("() => document.activeElement.dataset.mark = 'here'")
    page.evaluate("() => document.getElementById('refresh').click()")
    expect(page.locator("#library-status")).to_contain_text("The library has")
    assert page.evaluate("() => document.activeElement.dataset.mark") == "here"  # unchanged: not rebuilt
    store_voice(base_url, "kept-too")
    page.evaluate("() => document.getElementById('refresh').click()")
    expect(page.locator("#voices li[data-voice='kept-too']")).to_have_count(1)
    expect(play).to_be_focused()  # rebuilt: the same button of the same voice

    status = page.locator("#library-status")
    assert status.evaluate(f"e => e.closest('{LIVE}') !== null")
    item.get_by_role("button", name="Delete kept").focus()
    page.keyboard.press("Enter")
    expect(status).to_have_text("Press again to delete kept; move on to keep it.")
    page.keyboard.press("Shift+Tab")
    expect(status).to_have_text("Kept kept.")
    assert "kept" in api_voices(base_url)

    item.get_by_role("button", name="Use kept").click()
    expect(page.locator("#voice")).to_have_value("kept")
    expect(page.locator("#text")).to_be_focused()
    expect(page.locator("#speak-status")).to_have_text("The voice is now kept.")


def test_bad_input_shows_the_apis_own_message(page, base_url, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_bytes(b"these are words, not audio " * 20)
    expected = httpx.post(
        f"{base_url}/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("notes.wav", not_audio.read_bytes(), "audio/wav")},
    ).json()["error"]["message"]
    open_page(page, base_url)
    page.set_input_files("#clip-file", str(not_audio))
    page.click("#transcribe")
    expect(page.get_by_role("alert")).to_have_text(re.compile(re.escape(expected)))

    # a voice name the API refuses: its message, word for word
    with open(TEST_AUDIO, "rb") as clip:
        expected = httpx.post(
            f"{base_url}/v1/audio/voices",
            data={"name": "my voice!"},
            files={"audio_sample": ("ref.wav", clip, "audio/wav")},
        ).json()["error"]["message"]
    page.set_input_files("#clip-file", str(TEST_AUDIO))
    page.fill("#voice-name", "my voice!")
    page.check("#consent")
    page.click("#store")
    expect(page.locator("#error-text")).to_have_text(expected)
    page.click("#error-close")
    expect(page.get_by_role("alert")).to_be_hidden()
    page.click("#store")  # and Escape dismisses it too
    expect(page.locator("#error-text")).to_have_text(expected)
    page.keyboard.press("Escape")
    expect(page.get_by_role("alert")).to_be_hidden()


def test_the_focus_stays_where_the_keyboard_was(page, base_url):
    """An accessibility audit: Chromium takes the focus off a button that is disabled, so Transcribe and Store
    sent the keyboard back to the page's top while they worked; dismissing a Speak error put the focus on the
    hidden Stop. The field an error concerns says so (aria-invalid, described by the message)."""
    open_page(page, base_url)
    page.set_input_files("#clip-file", str(TEST_AUDIO))
    page.focus("#transcribe")
    page.keyboard.press("Enter")
    expect(page.locator("#transcript")).not_to_have_text(re.compile(r"^(|Transcribing…)$"))
    expect(page.locator("#transcribe")).to_be_focused()

    page.fill("#voice-name", "my voice!")
    page.check("#consent")
    page.focus("#store")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#store")).to_be_focused()
    name = page.locator("#voice-name")
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_have_attribute("aria-describedby", "name-hint error-text")
    page.keyboard.press("Escape")
    expect(page.locator("#store")).to_be_focused()  # back where the error came from
    expect(name).not_to_have_attribute("aria-invalid", "true")
    expect(name).to_have_attribute("aria-describedby", "name-hint")

    page.fill("#voice-name", "  ")  # the same for a voice's name, in the same place
    page.focus("#store")
    page.keyboard.press("Enter")
    blank_name = "Type a name for the voice: there are only spaces in it."
    expect(page.locator("#error-text")).to_have_text(blank_name)
    expect(name).to_have_attribute("aria-invalid", "true")
    page.keyboard.press("Escape")

    page.fill("#text", "   ")  # (required is met: the page says what is missing, the API is not asked)
    page.focus("#speak")
    page.keyboard.press("Enter")
    expect(page.locator("#error-text")).to_have_text("Type the text to speak: there are only spaces in it.")
    expect(page.locator("#text")).to_have_attribute("aria-invalid", "true")
    page.focus("#error-close")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#speak")).to_be_focused()  # not Stop, which went with the speech

    # A double click's second click lands on Speak while it is off: a disabled Speak lost the focus to the
    # page's body for the whole answer and after it (a web page trial); off by aria-disabled, it keeps it.
    page.fill("#text", "Hi.")
    page.dblclick("#speak")
    expect(page.locator("#download")).to_be_visible()
    expect(page.locator("#speak")).to_be_focused()


def test_a_speech_request_refused_for_a_voice_deleted_elsewhere_says_so_and_shows_no_player(page, base_url):
    """The API's message for it listed every voice there is, "and, in chat, clone" (a web page trial): the
    page says which voice went instead, and the menu follows."""
    store_voice(base_url, "gone-soon")
    open_page(page, base_url)
    assert httpx.delete(f"{base_url}/v1/audio/voices/gone-soon").status_code == 200  # from elsewhere
    page.fill("#text", "Hi.")
    page.select_option("#voice", "gone-soon")
    page.click("#speak")
    expect(page.locator("#error-text")).to_have_text(
        "The voice “gone-soon” is not in the library any more (deleted elsewhere?); choose another."
    )
    expect(page.locator("#download")).to_be_hidden()
    expect(page.locator("#speak")).to_be_enabled()
    # the voice menu and the library follow the library: the voice went
    expect(page.locator("#voice option[value='gone-soon']")).to_have_count(0)
    expect(page.locator("#voices li[data-voice='gone-soon']")).to_have_count(0)


def test_a_refused_request_leaves_the_previous_answer_playable(page, base_url):
    """A trial: a Speak the API refused (blank text, a 429) emptied the player and hid the last answer's
    download before the request went out. The player is now made at the first audio."""
    store_voice(base_url, "refusing")
    open_page(page, base_url)
    speak(page, "Hi.", "default", "mp3")
    href = page.locator("#download").get_attribute("href")
    assert httpx.delete(f"{base_url}/v1/audio/voices/refusing").status_code == 200  # the API refuses it now
    page.select_option("#voice", "refusing")
    page.click("#speak")
    expect(page.get_by_role("alert")).to_contain_text("“refusing” is not in the library")
    expect(page.locator("#download")).to_be_visible()
    assert page.locator("#download").get_attribute("href") == href
    assert page.evaluate("() => document.getElementById('player').src").startswith("blob:")
    assert page.evaluate("() => document.getElementById('player').error") is None


def test_text_over_the_limit_is_kept_whole_and_not_sent(browser, web_settings, engine, recognizer):
    """A trial: text pasted over the limit was cut to it unsaid (``maxlength``), and the counter counted an
    emoji as two. The text is now kept, the counter counts characters as the API does, and Speak says what
    is too long without sending anything."""
    from app import create_app

    settings = web_settings.model_copy(update={"max_input_characters": 30})
    with serve(create_app(settings, engine=engine, recognizer=recognizer)) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        open_page(page, url)
        expect(page.locator("#count")).to_have_text("0 / 30")
        sent = []
        page.on("request", lambda r: "/v1/audio/speech" in r.url and sent.append(r.url))
        text = "A sentence of forty characters, pasted."
        page.fill("#text", text)
        assert page.input_value("#text") == text  # whole
        expect(page.locator("#count")).to_have_text("39 / 30")
        expect(page.locator("#count")).to_have_class(re.compile(r"\bfull\b"))
        message = page.eval_on_selector("#text", "e => e.validationMessage")
        assert message == "The text has 39 characters, 9 more than the 30 of one request."
        page.click("#speak")
        page.wait_for_timeout(500)
        assert sent == [] and page.locator("#speak-status").inner_text() == ""
        page.fill("#text", "Hi " + "\U0001f600" * 27)  # 30 characters (57 UTF-16 units): within the limit
        assert page.eval_on_selector("#text", "e => e.validationMessage") == ""
        page.select_option("#voice", "default")
        page.click("#speak")
        expect(page.locator("#download")).to_be_visible()
        context.close()


def test_a_key_entered_while_the_model_loads_is_taken_once_the_service_is_ready(
    browser, web_settings, engine, recognizer
):
    """A web page trial: the right key, entered while the model loaded, was answered "still loading"; the
    pill then turned Ready and the voices loaded with the key, but the key form stayed, the focus in it."""
    from app import create_app

    settings = web_settings.model_copy(update={"api_key": SecretStr("page-secret")})
    app = create_app(settings, engine=engine, recognizer=recognizer)
    with serve(app) as url:
        app.state.ready = False  # as while the models load
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        expect(page.locator("#key-form")).to_be_visible()
        page.fill("#api-key", "page-secret")
        page.keyboard.press("Enter")
        expect(page.locator("#error-text")).to_contain_text("still loading")
        expect(page.locator("#key-form")).to_be_visible()
        app.state.ready = True
        expect(page.locator("#status")).to_have_text("Ready", timeout=15_000)
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#text")).to_be_focused()
        expect(page.get_by_role("alert")).to_be_hidden()
        context.close()


def test_a_clip_the_service_would_refuse_is_not_taken(browser, web_settings, engine, recognizer):
    """A web page trial: a 58 MB file was uploaded whole three times over (to transcribe, store and clone
    it) before the API's 413 spoke of "the request body"; an empty file was taken as the clip unsaid. The
    page reads the limit from the API's schema and refuses such a file at once, keeping the clip it had; a
    clip longer than a voice takes is said to be so; a name of spaces is not sent."""
    from app import create_app

    limits = {"max_upload_mb": 0.25, "max_reference_seconds": 3.0, "max_input_characters": 100}
    settings = web_settings.model_copy(update=limits)
    with serve(create_app(settings, engine=engine, recognizer=recognizer)) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        open_page(page, url)
        expect(page.locator("#count")).to_have_text("0 / 100")  # the schema's limits are read
        page.set_input_files("#clip-file", str(TEST_AUDIO))  # (189 KB, 4.0 s)
        said = "Uploaded: test_audio.wav, 4.0 s. A voice takes at most 3 s; it can be transcribed."
        expect(page.locator("#clip-info")).to_have_text(said)
        big = {"name": "big.wav", "mimeType": "audio/wav", "buffer": b"RIFF" + bytes(300 * 1024)}
        page.set_input_files("#clip-file", files=[big])
        expect(page.locator("#error-text")).to_have_text(
            "big.wav is 300 KB; the service takes files up to 256 KB."
        )
        expect(page.locator("#clip-file")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#clip-info")).to_contain_text("test_audio.wav")  # the clip it had stays
        assert page.evaluate("() => document.getElementById('clip-file').files.length") == 0
        empty = {"name": "empty.wav", "mimeType": "audio/wav", "buffer": b""}
        page.set_input_files("#clip-file", files=[empty])
        expect(page.locator("#error-text")).to_have_text("empty.wav is empty.")
        text = {"name": "notes.wav", "mimeType": "audio/wav", "buffer": b"not audio at all"}
        page.set_input_files("#clip-file", files=[text])
        expect(page.get_by_role("alert")).to_be_hidden()  # (what it said was about the clip refused)
        expect(page.locator("#clip-info")).to_have_text(
            "Uploaded: notes.wav, 16 bytes; this browser cannot play it (the service may still read it)."
        )
        stored: list[str] = []
        page.on(
            "request", lambda r: r.method == "POST" and "/v1/audio/voices" in r.url and stored.append(r.url)
        )
        page.fill("#voice-name", "   ")
        page.check("#consent")
        page.click("#store")
        expect(page.locator("#error-text")).to_have_text(
            "Type a name for the voice: there are only spaces in it."
        )
        assert stored == []  # the page said it; nothing was sent
        context.close()


def test_the_api_pages_render_with_nothing_from_elsewhere(page, base_url):
    """A new user's trial: /docs and /redoc loaded Swagger UI, ReDoc and fonts from CDNs (blank offline).
    Both render here from this server's files; what their scripts ask of elsewhere (ReDoc's bundle asks for
    its maker's logo) the pages' Content-Security-Policy stops in the browser, before any connection."""
    elsewhere: list[str] = []  # (ReDoc's worker is a blob: URL of the page's own)
    page.on("request", lambda r: r.url.startswith((base_url, "blob:")) or elsewhere.append(r.url))
    stopped: list[str] = []
    page.on("requestfailed", lambda r: r.failure == "csp" and stopped.append(r.url))
    page.goto(base_url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Higgs Audio OpenAI-compatible server")
    expect(page.locator(".opblock-summary-path", has_text="/v1/audio/speech").first).to_be_visible()
    page.goto(base_url + "/redoc")
    expect(page.locator("h1", has_text="Higgs Audio OpenAI-compatible server")).to_be_visible()
    assert elsewhere == stopped, (elsewhere, stopped)
    page.console.errors.clear()  # (the browser logged what the policy stopped, as it should)


def test_with_an_api_key_the_api_pages_open_and_take_the_key_for_what_is_tried(
    browser, web_settings, engine, recognizer
):
    """/docs answered 401 to a browser, which cannot send a key to open a page. It opens now, and its
    Authorize button takes the key for the requests tried from it."""
    from app import create_app

    settings = web_settings.model_copy(update={"api_key": SecretStr("docs-secret")})
    with serve(create_app(settings, engine=engine, recognizer=recognizer)) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/docs")
        page.locator("button.authorize").first.click()
        page.locator(".modal-ux input").fill("docs-secret")
        page.locator(".modal-ux button.authorize").click()
        page.locator(".modal-ux button.btn-done").click()
        models = page.locator(".opblock", has=page.locator(".opblock-summary-path", has_text="/v1/models"))
        models.first.locator(".opblock-summary").click()
        models.first.locator("button.try-out__btn").click()
        models.first.locator("button.execute").click()
        status = models.first.locator(".live-responses-table tr.response .response-col_status").first
        expect(status).to_have_text("200")
        context.close()


def test_a_503_makes_the_pill_check_at_once(browser, web_settings, engine, recognizer):
    """A trial: a call answered 503 "still loading" (a restarted service) left the pill saying Ready until
    its next check, 15 s later. The page's timers are frozen here, so only the check the error starts can
    change the pill."""
    from app import create_app

    app = create_app(web_settings, engine=engine, recognizer=recognizer)
    with serve(app) as url:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.clock.install()
        open_page(page, url)
        now = page.evaluate("() => Date.now()") / 1000  # the page's clock, paused a second on from now
        page.clock.pause_at(datetime.datetime.fromtimestamp(now + 1, datetime.UTC))
        app.state.ready = False  # as while the models load again
        page.fill("#text", "Hi.")
        page.click("#speak")
        expect(page.locator("#error-text")).to_contain_text("still loading")
        expect(page.locator("#status")).to_have_text("Model loading…")
        app.state.ready = True
        page.clock.run_for(3_000)  # the next check, 3 s later while loading
        expect(page.locator("#status")).to_have_text("Ready")
        expect(page.get_by_role("alert")).to_be_hidden()  # the "loading" error went with it
        context.close()


def test_cloning_the_clip_once_streams_it(page, base_url):
    open_page(page, base_url)
    expect(page.locator("#player")).to_be_hidden()  # empty controls were two Tab stops of nothing
    page.fill("#speed", "1.5")
    page.set_input_files("#clip-file", str(TEST_AUDIO))
    page.select_option("#voice", ":clip")
    # the chat endpoint that clones once has no speed: the slider says so by being off, and the readout
    # by showing the speed it speaks at (it kept saying 1.50x)
    expect(page.locator("#speed")).to_be_disabled()
    expect(page.locator("#format")).to_be_disabled()  # nor a format (it was left on, and ignored)
    expect(page.locator("#speed-out")).to_have_text("1.00×")
    expect(page.locator("#format-hint")).to_contain_text("at normal speed")
    speak(page, "Spoken once in the voice of the clip.", ":clip")
    assert download_head(page, 4) == b"RIFF"
    expect(page.locator("#player")).to_be_visible()
    page.wait_for_function("() => document.getElementById('player').duration > 0.5")
    assert "uploaded" not in api_voices(base_url)  # nothing was stored
    page.select_option("#voice", "alloy")
    expect(page.locator("#speed")).to_be_enabled()
    expect(page.locator("#speed-out")).to_have_text("1.50×")


def test_a_clip_whose_format_the_api_does_not_name_still_clones(page, base_url, tmp_path):
    """A new user's trial: an AIFF clip transcribed and stored fine, but cloning it once sent its extension
    as ``input_audio.format``, which the API refused ("unsupported audio format 'aiff'"). The page now
    sends a format only when the API knows its name; the server reads the bytes either way."""
    import soundfile as sf

    samples, rate = sf.read(TEST_AUDIO)
    clip = tmp_path / "clip.aiff"
    sf.write(clip, samples, rate, format="AIFF")
    open_page(page, base_url)
    page.set_input_files("#clip-file", str(clip))
    speak(page, "Spoken once in the voice of an AIFF clip.", ":clip")
    assert download_head(page, 4) == b"RIFF"
    expect(page.get_by_role("alert")).to_be_hidden()


# What each live region (the page's status messages) said, in order; a region's text is kept when it changes.
HEARD = """() => {
    window.heard = [];
    for (const region of document.querySelectorAll('[aria-live], [role=status], [role=alert], output')) {
        let last = region.textContent;
        new MutationObserver(() => {
            if (region.textContent !== last) heard.push((last = region.textContent));
        }).observe(region, {childList: true, subtree: true, characterData: true});
    }
}"""
LIVE = "[aria-live], [role=status], [role=alert], output"


def test_recording_with_the_fake_microphone_gives_a_clip_the_api_reads(page, base_url):
    open_page(page, base_url)
    page.evaluate(HEARD)
    page.click("#record")
    expect(page.locator("#record")).to_have_text("Stop recording")
    page.wait_for_timeout(2500)
    # the counter ticks where it is seen, not in a live region: a screen reader would talk every second
    clock = page.locator("#clip-clock")
    expect(clock).to_have_text(re.compile(r"^[1-9]\d* s$"))
    assert clock.evaluate(f"e => e.closest('{LIVE}')") is None
    assert page.evaluate("() => window.heard") == ["Recording (at most 30 s):"]
    page.click("#record")
    # a recording's webm states no length: the page decodes it to say how long it is
    expect(page.locator("#clip-info")).to_have_text(re.compile(r"^Recorded: recording\.webm, [23]\.\d s\.$"))
    page.click("#transcribe")  # webm/opus, decoded by the server
    expect(page.locator("#transcript")).not_to_have_text(re.compile(r"^(|Transcribing…)$"))
    expect(page.get_by_role("alert")).to_be_hidden()


def test_one_sound_at_a_time(page, base_url):
    if "sampled" not in api_voices(base_url):
        store_voice(base_url, "sampled")
    open_page(page, base_url)
    page.set_input_files("#clip-file", str(TEST_AUDIO))
    playing = "(id) => !document.getElementById(id).paused"
    page.evaluate("() => document.getElementById('clip-player').play()")
    page.wait_for_function(playing, arg="clip-player")
    page.get_by_role("button", name="Play the sample of sampled").click()
    page.wait_for_function(playing, arg="sample-player")
    assert not page.evaluate(playing, "clip-player")  # the sample paused the clip
    speak(page, "Louder than the sample.", "default", "wav")  # wav: through Web Audio, not an element
    assert not page.evaluate(playing, "sample-player")


# Web Audio contexts made suspended, so that an answer's audio is all still to play when its stream ends,
# as on a GPU (faster than real time), whatever this machine's speed; and kept, for their state.
SUSPENDED_AUDIO = """
    window.contexts = [];
    const Real = window.AudioContext;
    window.AudioContext = class extends Real {
        constructor(...args) { super(...args); this.suspend(); window.contexts.push(this); }
    };
"""


def test_speech_that_sounds_on_after_its_stream_can_be_stopped(page, base_url):
    """A new user's trial: a wav answer played on through Web Audio after "Done", with Stop gone, and the
    player's own play, a sample or the next answer sounded over it. Now Stop stays while it sounds and
    silences it, and anything else that plays does too."""
    page.add_init_script(SUSPENDED_AUDIO)
    open_page(page, base_url)
    all_closed = "() => window.contexts.length > 0 && window.contexts.every(c => c.state === 'closed')"
    speak(page, "Still to be heard when the stream has ended.", "default", "wav")
    expect(page.locator("#stop")).to_be_visible()  # the answer is done, its sound is not
    page.click("#stop")
    expect(page.locator("#stop")).to_be_hidden()
    page.wait_for_function(all_closed)
    expect(page.locator("#speak")).to_be_enabled()

    speak(page, "Heard once, not twice over.", "default", "wav")
    expect(page.locator("#stop")).to_be_visible()
    page.evaluate("() => document.getElementById('player').play()")  # its replay silences it
    expect(page.locator("#stop")).to_be_hidden()
    page.wait_for_function(all_closed)


@pytest.mark.parametrize("mic", ["opens after both clicks", "opens between the clicks"])
def test_a_double_click_on_record_records_once(page, base_url, mic):
    """CI once saw the microphone open between the two clicks of a double click: the second click stopped the
    recording it had just started. The second click of a double click (detail 2) now never acts."""
    page.add_init_script(
        """{
            window.microphones = 0;
            const ask = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
            navigator.mediaDevices.getUserMedia = (c) => (window.microphones++, ask(c));
        }"""
    )
    open_page(page, base_url)
    if mic == "opens after both clicks":
        page.dblclick("#record")
    else:
        box = page.locator("#record").bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.click(x, y)
        expect(page.locator("#record")).to_have_text("Stop recording")
        page.mouse.down(click_count=2)  # the double click's second click, late
        page.mouse.up(click_count=2)
        page.wait_for_timeout(500)
    expect(page.locator("#record")).to_have_text("Stop recording")
    page.wait_for_timeout(1500)
    page.click("#record")
    info = page.locator("#clip-info")
    expect(info).to_contain_text("Recorded: recording.webm")
    page.wait_for_timeout(1000)  # a second recorder would still be ticking here
    expect(info).to_contain_text("Recorded: recording.webm")
    expect(page.locator("#clip-clock")).to_be_empty()
    assert page.evaluate("() => window.microphones") == 1


def test_where_the_browser_cannot_record_the_page_says_why(page, base_url):
    """An accessibility audit: on a plain-http LAN address Record was disabled, skipped by Tab, with the
    reason only in a tooltip. Now it stays reachable, off, and described by the reason, shown."""
    page.add_init_script("delete window.MediaRecorder")  # as where the page is not a secure context
    open_page(page, base_url)
    why = page.locator("#record-why")
    expect(why).to_be_visible()
    expect(why).to_contain_text("recording needs HTTPS or localhost")
    record = page.locator("#record")
    assert "record-why" in record.get_attribute("aria-describedby").split()
    expect(record).to_have_attribute("aria-disabled", "true")
    page.focus("#clip-file")
    page.keyboard.press("Tab")
    expect(record).to_be_focused()
    page.keyboard.press("Enter")  # nothing to do
    expect(record).to_have_text("Record")
    expect(page.get_by_role("alert")).to_be_hidden()


def test_keyboard_reaches_every_control_with_a_visible_focus(page, base_url):
    open_page(page, base_url)
    reached = []
    for _ in range(60):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent"))
    for control in ["text", "voice", "format", "speed", "instructions", "speak", "clip-file", "record"]:
        assert control in reached, (control, reached)
    page.focus("#speak")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert page.evaluate("() => document.activeElement.id") == "speak" and outline == "solid"
    # every form control has a label
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
                 .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"""
    )
    assert unlabelled == []
    # the slider says its value with a unit, and the value shown is not a second live announcement
    page.focus("#speed")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#speed")).to_have_attribute("aria-valuetext", "1.05 times")
    expect(page.locator("#speed-out")).to_have_text("1.05×")
    assert page.locator("#speed-out").evaluate(f"e => e.closest('{LIVE}')") is None
    # hints are tied to their controls; the key form and the error are inside the main landmark
    for control, hint in [("api-key", "key-hint"), ("clip-file", "clip-hint"), ("record", "clip-hint")]:
        assert hint in page.locator(f"#{control}").get_attribute("aria-describedby").split(), control
    outside = "() => ['error', 'key-form'].filter(id => !document.getElementById(id).closest('main'))"
    assert page.evaluate(outside) == []


def luminance(colour: str) -> float:
    """WCAG relative luminance of a CSS ``rgb()``/``rgba()`` colour as getComputedStyle gives it."""
    channels = [float(v) / 255 for v in re.findall(r"[\d.]+", colour)[:3]]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two CSS colours."""
    high, low = sorted([luminance(a), luminance(b)], reverse=True)
    return (high + 0.05) / (low + 0.05)


# The colours that must stand apart, read from the page; the danger and recording buttons are made for it.
COLOURS = """() => {
    const style = (selector, pseudo) => getComputedStyle(document.querySelector(selector), pseudo);
    const button = (kind) => {
        const made = document.createElement('button');
        made.className = kind;
        document.querySelector('.library').append(made);
        const {color, backgroundColor} = getComputedStyle(made);
        made.remove();
        return [color, backgroundColor];
    };
    return {
        danger: button('danger'),
        recording: button('recording'),
        ring: getComputedStyle(document.activeElement).outlineColor,
        backgrounds: ['.card', 'body', '#error'].map((s) => style(s).backgroundColor),
        pill: [style('#status').color, style('#status').backgroundColor],
        field: [style('#voice-name').borderTopColor, style('.card').backgroundColor],
        placeholder: [style('#text', '::placeholder').color, style('#text').backgroundColor],
    };
}"""


def test_colours_meet_the_contrast_minimums_in_both_schemes(page, base_url):
    """An accessibility audit measured white on light pink (2.3:1) on the dark scheme's Confirm delete and
    Stop recording buttons, an amber focus ring at 2:1 on white, the Ready pill at 4.47:1, field edges at
    1.4:1 and the dark scheme's placeholder at 3.5:1. Text needs 4.5:1, the ring and the edges 3:1."""
    open_page(page, base_url)
    page.keyboard.press("Tab")  # the skip link, with the keyboard's focus ring
    for scheme in ["light", "dark"]:
        page.emulate_media(color_scheme=scheme)
        colours = page.evaluate(COLOURS)
        for name in ["danger", "recording", "pill", "placeholder"]:
            assert contrast(*colours[name]) >= 4.5, (scheme, name, colours[name])
        assert contrast(*colours["field"]) >= 3, (scheme, colours["field"])
        for background in colours["backgrounds"]:
            assert contrast(colours["ring"], background) >= 3, (scheme, colours["ring"], background)


LONGEST_NAME = "b" * 64  # the longest voice name the API takes

OVERFLOWING = """() => [...document.querySelectorAll('.card, .card *')]
    .filter(e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX === 'visible')
    .map(e => e.id || e.className || e.tagName)"""


def store_longest_name(url: str) -> None:
    if LONGEST_NAME not in api_voices(url):
        store_voice(url, LONGEST_NAME)


def test_fits_a_phone_width_screen(browser, base_url):
    store_longest_name(base_url)
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    open_page(page, base_url)
    expect(page.locator(f"#voices li[data-voice='{LONGEST_NAME}']")).to_be_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    assert page.evaluate(OVERFLOWING) == []
    box = page.locator("#speak").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 360
    # text at twice the size (the browser's setting): the library's buttons wrap, nothing scrolls sideways
    page.evaluate("() => (document.documentElement.style.fontSize = '200%')")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    page.evaluate("() => (document.documentElement.style.fontSize = '')")

    # an error shows above the cards: pressing a button far below brings it into view
    page.click("#transcribe")  # no clip yet
    expect(page.locator("#error-text")).to_have_text("upload or record a reference clip first")
    expect(page.locator("#error")).to_be_in_viewport()
    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()
    context.close()


def test_a_long_voice_name_keeps_the_columns_apart(page, base_url):
    store_longest_name(base_url)
    open_page(page, base_url)
    page.select_option("#voice", LONGEST_NAME)
    page.set_input_files("#clip-file", str(TEST_AUDIO))
    page.fill("#voice-name", "c" * 64)
    page.fill("#voice-transcript", "We need to finish the report before the meeting on Friday morning.")
    page.check("#consent")
    page.click("#store")
    expect(page.locator("#speak-status")).to_contain_text("Stored the voice ccc")
    left = page.locator(".layout > .column").first.bounding_box()
    right = page.locator(".clip").bounding_box()
    assert left["x"] + left["width"] <= right["x"]
    for selector in ["#speak-status", "#voice", f"#voices li[data-voice='{LONGEST_NAME}']"]:
        box = page.locator(selector).bounding_box()
        assert box["x"] + box["width"] <= right["x"], selector
    assert page.evaluate(OVERFLOWING) == []
    assert httpx.delete(f"{base_url}/v1/audio/voices/{'c' * 64}").status_code == 200


def test_the_page_notices_when_the_service_goes_away(page, base_url):
    cable = Cable(base_url)
    open_page(page, cable.url)
    page.fill("#text", "A sentence that will not be finished. " * 3)
    page.select_option("#voice", "default")
    page.select_option("#format", "wav")
    page.click("#speak")
    expect(page.locator("#speak-status")).to_contain_text("Playing while")
    cable.cut()  # the connection breaks while the answer streams
    expect(page.locator("#error-text")).to_have_text(
        "the connection to the service broke before the answer was complete"
    )
    expect(page.locator("#speak")).to_be_enabled()
    expect(page.locator("#status")).to_have_text("Ready")  # checked again at once: the service is there
    cable.unplug()  # now it is gone: the pill notices by itself (it checks every 15 s while ready)
    expect(page.locator("#status")).to_have_text("Offline", timeout=25_000)
    page.click("#refresh")
    expect(page.locator("#error-text")).to_have_text("the service could not be reached; is it running?")


def test_a_page_opened_while_the_model_loads_loads_once_it_is_ready(
    browser, web_settings, engine, recognizer
):
    """A new user's trial: a page opened while the model loaded kept its "still loading" error and an empty
    library after the pill said Ready. Now readiness reloads what failed and clears that error. The
    instructions field takes the API's own limit for instructions, not the speech text's."""
    from app import create_app

    settings = web_settings.model_copy(update={"max_input_characters": 100})
    app = create_app(settings, engine=engine, recognizer=recognizer)
    with serve(app) as url:
        store_voice(url, "waited-for")
        app.state.ready = False  # as while the models load
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        expect(page.locator("#error-text")).to_contain_text("still loading")
        expect(page.locator("#status")).to_have_text("Model loading…")
        assert page.locator("#voices li").count() == 0
        expect(page.locator("#voices-empty")).to_have_text("The voices could not be loaded.")  # not "none"
        app.state.ready = True
        expect(page.locator("#status")).to_have_text("Ready", timeout=15_000)
        expect(page.locator("#voices li[data-voice='waited-for']")).to_be_visible()
        expect(page.get_by_role("alert")).to_be_hidden()
        expect(page.locator("#voice option[value='waited-for']")).to_have_count(1)
        expect(page.locator("#count")).to_have_text("0 / 100")
        expect(page.locator("#voices-empty")).to_be_hidden()
        assert page.locator("#instructions").get_attribute("maxlength") == "4096"
        context.close()


def test_with_an_api_key_the_page_asks_for_it_and_then_works(browser, web_settings, engine, recognizer):
    from app import create_app

    settings = web_settings.model_copy(update={"api_key": SecretStr("page-secret")})
    with serve(create_app(settings, engine=engine, recognizer=recognizer)) as url:
        store_voice(url, "keyed-voice", headers={"Authorization": "Bearer page-secret"})
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")  # the page itself is public
        expect(page.locator("#key-form")).to_be_visible()
        # in the page's words, not the API's "send Authorization: Bearer <key>" (a web page trial)
        expect(page.locator("#error-text")).to_have_text("This server needs an API key; enter it below.")
        assert page.locator("#voices li").count() == 0

        page.fill("#api-key", "wrong")
        page.keyboard.press("Enter")
        expect(page.locator("#error-text")).to_have_text(
            "That API key is not valid here; enter the key this server was given."
        )

        page.fill("#api-key", "page-secret")
        page.keyboard.press("Enter")
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#text")).to_be_focused()  # not the page's top, with the form gone
        expect(page.locator("#voices li[data-voice='keyed-voice']")).to_be_visible()
        assert page.evaluate("() => sessionStorage.getItem('higgs-api-key')") == "page-secret"
        speak(page, "Spoken behind a key.", "keyed-voice", "mp3")
        page.wait_for_function("() => document.getElementById('player').currentTime > 0")
        # the sample, fetched with the key
        page.locator("#voices li[data-voice='keyed-voice']").get_by_role("button", name="Play").click()
        page.wait_for_function("() => document.getElementById('sample-player').duration > 0")
        assert httpx.get(f"{url}/v1/audio/voices/keyed-voice/sample").status_code == 401
        context.close()
        # the public prefixes (/web/, /docs/assets/) open nothing else, however the path is spelled
        host, port = url.removeprefix("http://").split(":")
        for path in [
            "/web/../v1/audio/voices",
            "/web/%2e%2e/v1/audio/voices",
            "/web/x/../../metrics",
            "/docs/assets/../../v1/audio/voices",
            "/docs/assets/%2e%2e/%2e%2e/v1/audio/voices",
        ]:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            connection.request("GET", path)
            answer = connection.getresponse()
            assert answer.status == 404 and b"keyed-voice" not in answer.read(), path
            connection.close()
