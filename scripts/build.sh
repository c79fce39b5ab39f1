#!/usr/bin/env bash
# Configures and builds moelab (Release, Ninja) into build/. Idempotent: an up-to-date build returns at once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install-deps.sh"
if [[ ! -f "$root/build/build.ninja" ]]; then
  cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
fi
ninja -C "$root/build" ${MOELAB_BUILD_QUIET:+--quiet}
