#!/usr/bin/env bash
# The main job: installs what is missing, builds, assembles the default corpus, encodes it, and trains the
# default dense model on it. Every step is idempotent; rerunning skips what is already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
echo "== [1/4] dependencies and build"
scripts/build.sh
echo "== [2/4] default corpus"
scripts/fetch-corpus.sh --out data/corpus
echo "== [3/4] tokens"
if [[ ! -f data/tokens/train.bin || ! -f data/tokens/val.bin ]]; then
  build/moelab data bytes data/corpus/train --out data/tokens/train.bin
  build/moelab data bytes data/corpus/val --out data/tokens/val.bin
else
  echo "data/tokens already encoded"
fi
echo "== [4/4] training configs/quickstart.toml"
build/moelab train --config configs/quickstart.toml "$@"
