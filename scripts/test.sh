#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs the whole suite under CTest.
# The PyTorch fixtures are committed, so PyTorch is not needed here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
ctest --test-dir "$root/build" --output-on-failure -j "$(nproc)" "$@"
