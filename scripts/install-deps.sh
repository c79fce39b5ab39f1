#!/usr/bin/env bash
# Installs every Debian package moelab needs to build, test and run. Idempotent: packages already present
# are not reinstalled and apt is not touched at all when nothing is missing.
#   scripts/install-deps.sh           build + test dependencies
#   scripts/install-deps.sh --fixtures also PyTorch, needed only to regenerate test fixtures / run references
# Then llama.cpp for the GGUF export test: node-llama-cpp (pinned) from the npm registry into tests/llama/node_modules
# (git-ignored), with the machine's Node.js (Debian's nodejs and npm when there is none).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

packages=(
  build-essential cmake ninja-build pkg-config git
  libdnnl-dev libopenblas-dev libomp-dev
  libcli11-dev libtomlplusplus-dev nlohmann-json3-dev libsentencepiece-dev libnlopt-cxx-dev libsqlite3-dev libssl-dev
  zlib1g-dev libzstd-dev zstd procps
  libgtest-dev libbenchmark-dev
  gnuplot-nox fonts-dejavu-core chromium python3
  libopenmpi-dev openmpi-bin
)
if [[ "${1:-}" == "--fixtures" ]]; then
  # libopenblas0-openmp: the OpenMP build of OpenBLAS, which bench/torch_reference.py loads ahead of the default
  # pthreads one so that its threads do not spin beside PyTorch's OpenMP pool on the same cores
  packages+=(python3-torch python3-numpy libopenblas0-openmp)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  missing+=(nodejs npm)
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if (( ${#missing[@]} > 0 )); then
  echo "[moelab] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# node-llama-cpp ships llama.cpp prebuilt for linux-x64 inside its npm packages: nothing is compiled, nothing is
# fetched from elsewhere. A failure here is reported, and the export test then fails saying why.
llama_version="3.21.1"
llama_dir="$root/tests/llama"
installed="$llama_dir/node_modules/node-llama-cpp/package.json"
if ! [[ -f "$installed" ]] || ! grep -q "\"version\": \"$llama_version\"" "$installed"; then
  echo "[moelab] installing node-llama-cpp@$llama_version (llama.cpp) into tests/llama"
  if ! (cd "$llama_dir" && npm i -E --no-audit --no-fund --loglevel=error "node-llama-cpp@$llama_version" > /dev/null); then
    echo "[moelab] warning: npm could not install node-llama-cpp@$llama_version; the GGUF test against llama.cpp" \
         "will fail until it is installed" >&2
  fi
fi
