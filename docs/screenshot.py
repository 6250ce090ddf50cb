"""Take the README's screenshot of the web page (docs/web.png) in Debian's headless Chromium.

    .venv/bin/python docs/screenshot.py [OUT.png]

Serves the tiny random-weight models (see tests/tiny_models.py) on a loopback port with two stored voices,
speaks a sentence through the page, loads a reference clip, and captures the page at desktop width.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "web.png"
    work = Path(tempfile.mkdtemp(prefix="higgs-screenshot-"))
    from tiny_models import write_tiny_models  # sets the private hub cache before transformers loads

    os.environ.update(write_tiny_models(work))
    os.environ["HIGGS_VOICES_DIR"] = str(work / "voices")
    os.environ["HIGGS_MAX_AUDIO_SECONDS"] = "3"
    os.environ["HIGGS_WARMUP"] = "false"

    import httpx
    from browser import launch, serve
    from playwright.sync_api import expect, sync_playwright

    from app import create_app

    transcripts = json.loads((ROOT / "tests" / "fixtures" / "transcripts.json").read_text())
    clips = {"narrator": ROOT / "test_audio.wav", "amelia": ROOT / "tests" / "fixtures" / "speech_female.wav"}
    with serve(create_app()) as url, sync_playwright() as playwright:
        for name, clip in clips.items():
            response = httpx.post(
                f"{url}/v1/audio/voices",
                data={"name": name, "transcript": transcripts[clip.name]},
                files={"audio_sample": (clip.name, clip.read_bytes(), "audio/wav")},
                timeout=300,
            )
            response.raise_for_status()
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.set_default_timeout(300_000)
        page.goto(url + "/")
        expect(page.locator("#status")).to_have_text("Ready", timeout=300_000)
        text = "Welcome back to the show. Today we talk about the sea, the wind and the small boats."
        page.fill("#text", text)
        page.select_option("#voice", "narrator")
        page.fill("#instructions", "A cosy radio studio.")
        page.click("#speak")
        expect(page.locator("#download")).to_be_visible(timeout=300_000)
        page.evaluate("() => { const a = document.getElementById('player'); a.pause(); a.currentTime = 1; }")
        page.set_input_files("#clip-file", str(ROOT / "tests" / "fixtures" / "speech_female.wav"))
        page.fill("#voice-name", "amelia-2")
        page.evaluate("() => document.activeElement.blur()")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
