#!/usr/bin/env bash
# Renders a moelab report in headless Chromium, takes a screenshot, and fails if any image did not decode, a
# script raised an error, or the page has no figures. The page checks itself on load (a small script at the end
# of index.html sets data-report-check on <body>); this reads the DOM after load through --dump-dom.
#   scripts/check-report.sh runs/study/report/index.html [--screenshot shot.png]
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  echo "usage: scripts/check-report.sh REPORT/index.html [--screenshot FILE.png]" >&2
  exit 2
fi
page="$(realpath "$1")"
shot="$(dirname "$page")/screenshot.png"
if [[ "${2:-}" == "--screenshot" ]]; then shot="$(realpath -m "$3")"; fi
[[ -f "$page" ]] || { echo "check-report: no such page: $page" >&2; exit 1; }
browser="$(command -v chromium || command -v chromium-browser || true)"
[[ -n "$browser" ]] || { echo "check-report: chromium is not installed (scripts/install-deps.sh installs it)" >&2; exit 1; }

flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions
       --user-data-dir="$(mktemp -d)")
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
timeout 120 "$browser" "${flags[@]}" --virtual-time-budget=15000 --dump-dom "file://$page" \
  > "$work/dom.html" 2> "$work/chromium.log" || { echo "check-report: chromium failed:" >&2; tail -5 "$work/chromium.log" >&2; exit 1; }

status="$(grep -o 'data-report-check="[^"]*"' "$work/dom.html" | head -1 | sed 's/^data-report-check="//; s/"$//')"
images="$(grep -o 'data-report-images="[0-9]*"' "$work/dom.html" | head -1 | grep -o '[0-9]*' || true)"
expected="$(grep -o '<img ' "$page" | wc -l)"
if [[ -z "$status" ]]; then
  echo "check-report: the page's self-check did not run (no data-report-check after load): a script error or not a moelab report" >&2
  exit 1
fi
if [[ "$status" != "ok" ]]; then
  echo "check-report: $status" >&2
  exit 1
fi
if [[ "$expected" -lt 1 || "$images" != "$expected" ]]; then
  echo "check-report: the page shows ${images:-0} images, expected $expected (at least 1)" >&2
  exit 1
fi
# Full-page screenshot: tall enough for every figure.
height=$(( 1200 + 560 * expected ))
timeout 120 "$browser" "${flags[@]}" --virtual-time-budget=15000 --window-size=1280,"$height" \
  --screenshot="$shot" "file://$page" > /dev/null 2>> "$work/chromium.log" || true
if [[ ! -s "$shot" ]]; then
  echo "check-report: no screenshot was written to $shot" >&2
  exit 1
fi
echo "check-report: ok: $expected figures decoded, no script errors; screenshot $shot"
