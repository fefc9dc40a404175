#!/usr/bin/env bash
# What the test suite needs beyond pip: Debian's Chromium for the web app's browser test (Playwright drives the
# system browser; it downloads none). Does nothing when chromium is already there. Run by the README's test line
# and so by .ci/run.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "the browser test needs Chromium: run 'sudo apt-get install -y chromium' (Debian/Ubuntu) and try again" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null
