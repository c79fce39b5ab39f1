#!/usr/bin/env bash
# The main job: installs what is missing, builds, assembles the default corpus, trains a tokenizer and encodes
# the corpus, trains the default dense model on it, and samples from it. Every step is idempotent: rerunning
# skips what is done, and an interrupted training run resumes from its last checkpoint.
# Extra arguments go to `moelab train`, e.g. scripts/quickstart.sh --set train.steps=200
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
echo "== [1/5] dependencies and build"
scripts/build.sh
echo "== [2/5] default corpus (docs/data.md)"
scripts/fetch-corpus.sh --out data/corpus
echo "== [3/5] tokenizer and token shards"
build/moelab data prepare --corpus data/corpus --out data/prepared
echo "== [4/5] training configs/quickstart.toml"
build/moelab train --config configs/quickstart.toml --resume "$@"
echo "== [5/5] a sample from the trained model"
build/moelab generate --checkpoint runs/quickstart --prompt "The king said" --max-tokens 60 --temperature 0.8 \
  --top-p 0.95 --seed 1
