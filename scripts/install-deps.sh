#!/usr/bin/env bash
# Installs every Debian package moelab needs to build, test and run. Idempotent: packages already present
# are not reinstalled and apt is not touched at all when nothing is missing.
#   scripts/install-deps.sh           build + test dependencies
#   scripts/install-deps.sh --fixtures also PyTorch, needed only to regenerate test fixtures / run references
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libdnnl-dev libopenblas-dev libomp-dev
  libcli11-dev libtomlplusplus-dev nlohmann-json3-dev libsentencepiece-dev libnlopt-cxx-dev libsqlite3-dev
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

if (( ${#missing[@]} == 0 )); then
  exit 0
fi

echo "[moelab] installing: ${missing[*]}"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
