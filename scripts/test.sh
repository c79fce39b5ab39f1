#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite under CTest, then runs the
# quickstart's CI-sized variant end to end (corpus, sweeps, fits, report; ~2 minutes) and renders its report in
# headless Chromium. The PyTorch fixtures are committed, so PyTorch is not needed here.
#   scripts/test.sh            everything
#   scripts/test.sh -R Report  only the CTest tests matching a regex (arguments go to ctest; skips the quickstart)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
ctest --test-dir "$root/build" --output-on-failure -j "$(nproc)" "$@"
if (( $# == 0 )); then
  echo "== quickstart --tiny (the main job's path on very small models)"
  "$root/scripts/quickstart.sh" --tiny
  "$root/scripts/check-report.sh" "$root/runs/study-tiny/report/index.html"
fi
