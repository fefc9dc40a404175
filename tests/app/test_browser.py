"""The web app in a real browser: Debian's headless Chromium driven by Playwright (the system browser, no
browser download). `attnkit app` runs as a subprocess on 127.0.0.1; the test types a prompt, runs Maps and
Edit, waits for the images and the word labels, uploads an image in Real image, inverts and edits it, and
saves screenshots. The README's test line installs Chromium (scripts/install-test-deps.sh)."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "-m", "attnkit", "app", "--model", "tiny", "--port", str(port),
                                "--out", str(out), "--threads", "1", "--quiet"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"the app did not start: {process.stderr.read()[-3000:]}") from None
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    assert CHROMIUM, ("the browser test needs Debian's chromium: apt-get install chromium "
                      "(scripts/install-test-deps.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(app_url)
        page.wait_for_selector("#maps-run")
        yield page
        browser.close()


def fill(page, elem_id, text):
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(text))
    box.press("Tab")  # gradio takes a number's value on change


def test_maps_then_edit_then_a_real_image(page, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    fill(page, "maps-prompt", "a red circle and a blue square")
    fill(page, "maps-steps", 2)
    page.click("#maps-run")
    captions = page.locator("#maps-words .caption-label, #maps-words figcaption, #maps-words [class*=caption]")
    captions.first.wait_for()
    page.wait_for_selector("#maps-image img")
    labels = [t.strip() for t in captions.all_inner_texts() if t.strip()]
    assert labels == ["a", "red", "circle", "and", "blue", "square"], labels
    assert page.locator("#maps-words img").count() == 6
    assert page.locator("#maps-cli textarea, #maps-cli input").first.input_value().startswith("attnkit maps ")
    page.locator("#maps-image img").click(position={"x": 60, "y": 60})  # that pixel's self-attention
    page.wait_for_selector("#maps-self img")
    page.screenshot(path=str(shots / "maps.png"), full_page=True)

    page.get_by_role("tab", name="Edit", exact=True).click()
    fill(page, "edit-source", "a lemon cake")
    fill(page, "edit-targets", "a chocolate cake\na lego cake")
    fill(page, "edit-reweight", "lego=2")
    fill(page, "edit-steps", 2)
    page.click("#edit-run")
    page.wait_for_selector("#edit-grid img")
    assert "--to 'a lego cake'" in page.locator("#edit-cli textarea, #edit-cli input").first.input_value()
    page.screenshot(path=str(shots / "edit.png"), full_page=True)

    page.get_by_role("tab", name="Real image", exact=True).click()
    photo = io.BytesIO()
    Image.new("RGB", (48, 40), (220, 30, 30)).save(photo, format="PNG")
    page.locator("#real-upload input[type=file]").set_input_files(
        {"name": "my photo.png", "mimeType": "image/png", "buffer": photo.getvalue()})
    fill(page, "real-caption", "a red square on a white background")
    page.locator("#real-method input").first.fill("ddim")
    page.keyboard.press("Enter")
    fill(page, "real-steps", 3)
    page.wait_for_timeout(500)  # the upload finishes
    page.click("#real-invert")
    page.wait_for_selector("#real-rebuilt img")
    assert "PSNR" in page.locator("#real-status").inner_text()
    fill(page, "real-targets", "a blue square on a white background")
    page.click("#real-edit")
    page.wait_for_selector("#real-grid img")
    assert "--image" in page.locator("#real-cli textarea, #real-cli input").first.input_value()
    page.screenshot(path=str(shots / "real_image.png"), full_page=True)
    for name in ("maps.png", "edit.png", "real_image.png"):
        assert (shots / name).stat().st_size > 10_000


def test_an_error_is_a_message_in_the_page(page):
    page.get_by_role("tab", name="Maps", exact=True).click()
    fill(page, "maps-prompt", "red " * 100)
    page.click("#maps-run")
    toast = page.locator(".toast-body, [data-testid='toast-body']").first
    toast.wait_for()
    assert "tokens long" in toast.inner_text() and "Traceback" not in page.content()
