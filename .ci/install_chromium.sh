#!/usr/bin/env bash
# Install headless Chromium from Debian's packages: tests/test_review_page.py renders the HTML
# review page in it (its images load, its links resolve). Idempotent: an installed browser is
# left alone. Needs root (CI runs as root). When it cannot be installed (no apt, no mirror), it
# says so and exits 0: the browser test is then skipped with that reason, the others still run.
set -uo pipefail

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "headless browser: $(command -v "$name") ($("$name" --version 2>/dev/null | head -1))"
        exit 0
    fi
done
if command -v apt-get >/dev/null 2>&1 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
    echo "installed $(chromium --version 2>/dev/null | head -1)"
else
    echo "chromium could not be installed (apt-get install chromium): the review page's browser test will be skipped"
fi
exit 0
