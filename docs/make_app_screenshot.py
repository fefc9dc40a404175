"""Redraw docs/app_maps.png: the web app's Maps tab on the bundled model, in headless Chromium (Playwright with
the system browser). ``python docs/make_app_screenshot.py``"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parent / "app_maps.png"


def main() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = subprocess.Popen([sys.executable, "-m", "attnkit", "app", "--port", str(port), "--threads", "1",
                            "--quiet", "--out", tempfile.mkdtemp()], env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                 args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.click("#maps-run")
            page.wait_for_selector("#maps-words img")
            page.locator("#maps-image img").click(position={"x": 90, "y": 150})
            page.wait_for_selector("#maps-self img")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
