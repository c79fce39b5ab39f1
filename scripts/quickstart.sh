#!/usr/bin/env bash
# The main job: on a fresh Debian 12 machine, installs what is missing, builds, assembles the default corpus, and
# runs a CPU-sized study of the three papers' questions, every run with 4 seeds paired by data order: IsoFLOP
# sparsity curves at 3 budgets (dense, 4 and 16 experts, each over a shape ladder around its optimum), granularity
# G = 1..8 at 3 budgets with the granularity law, loss against sparsity at fixed total parameters, downstream
# evaluation zero- and few-shot, and every replicate of the best dense and MoE configuration fine-tuned on a built-in task. It fits the
# laws, writes the HTML report with its findings table (each claim of the papers: estimate, 95% interval, runs per
# arm, the smallest effect the design detects, verdict) and prints the headline. Measured: docs/report.md.
# Every step is idempotent: rerun it after an interruption and it resumes (finished runs are skipped, interrupted
# ones continue from their checkpoints).
#
#   scripts/quickstart.sh              the study, into runs/study (report: runs/study/report/index.html)
#   scripts/quickstart.sh --hours H    the same study scaled to about H hours of training on this machine: more
#                                      seeds and every budget scaled up (ETA printed before training), into
#                                      runs/study-<H>h
#   scripts/quickstart.sh --tiny       the same path on very small models, into runs/study-tiny (a minute once built)
#   scripts/quickstart.sh --jobs N     runs trained at once (default 2, one thread each)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

variant=full
jobs=2
hours=""
while (( $# )); do
  case "$1" in
    --tiny) variant=tiny; shift ;;
    --jobs) [[ $# -ge 2 ]] || { echo "quickstart: --jobs needs a number" >&2; exit 2; }; jobs="$2"; shift 2 ;;
    --hours)
      [[ $# -ge 2 && "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "quickstart: --hours needs a number of hours, e.g. --hours 3" >&2; exit 2; }
      hours="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ "$variant" == tiny ]]; then
  [[ -z "$hours" ]] || { echo "quickstart: --hours and --tiny do not go together" >&2; exit 2; }
  study=runs/study-tiny; spec=configs/study/tiny-
  task_items=40; ft_steps=10; ft_items=40
else
  study=runs/study; spec=configs/study/
  task_items=100; ft_steps=450; ft_items=0
  [[ -z "$hours" ]] || study="runs/study-${hours}h"
fi
start=$(date +%s)
stage() { echo; echo "== [$1/6] $2   ($(( ($(date +%s) - start) / 60 )) min elapsed)"; }

if [[ -n "$hours" ]]; then
  echo "quickstart --hours $hours: the default study with more seeds and larger budgets; ETA: about $hours h of"
  echo "training plus about 15 min of build, data, evaluation and report (more on a slower machine)"
fi
stage 1 "dependencies and build"
scripts/build.sh
moelab=build/moelab

stage 2 "default corpus (docs/data.md), built-in tasks (docs/tasks.md) and a 512-token vocabulary"
scripts/fetch-corpus.sh --out data/corpus
$moelab data prepare --corpus data/corpus --out data/prepared-v512 --vocab 512 --quiet

stage 3 "sweeps: plans"
# Plans a sweep; prints its last line and, when the planner leaves runs out (a ladder without a shape near the
# wanted size, more training tokens than the corpus holds), says which, so that no arm goes missing unannounced.
plan() {  # SPEC NAME
  local out left
  out=$($moelab sweep plan "$1" --out "$study/$2")
  tail -1 <<<"$out"
  left=$(sed -n '/^infeasible runs/,/^planned /{/^  /p}' <<<"$out")
  if [[ -n "$left" ]]; then
    echo "note: the $2 sweep leaves out $(wc -l <<<"$left") runs (every seed of these configurations):"
    grep -v -- '-s[0-9]*: ' <<<"$left" || true
  fi
}
for sweep in sparsity granularity fixed-params; do
  if [[ -n "$hours" ]]; then
    # The longer study: the default specs with every budget scaled by F and more seeds (scripts/scale-study.py
    # says how F and the seeds follow from the hours, from the default study's measured FLOP rate).
    mkdir -p "$study/specs"
    /usr/bin/python3 scripts/scale-study.py "${spec}$sweep.toml" --hours "$hours" > "$study/specs/$sweep.toml.tmp"
    mv "$study/specs/$sweep.toml.tmp" "$study/specs/$sweep.toml"
    plan "$study/specs/$sweep.toml" "$sweep"
  else
    plan "${spec}$sweep.toml" "$sweep"
  fi
done

stage 4 "sweeps: training (progress: [runs done/total], ETA)"
$moelab sweep run "$study/sparsity" --jobs "$jobs" --threads-per-job 1
$moelab sweep run "$study/granularity" --jobs "$jobs" --threads-per-job 1
$moelab sweep run "$study/fixed-params" --jobs "$jobs" --threads-per-job 1

stage 5 "downstream: built-in tasks zero- and 5-shot (first $task_items test items), and every replicate of the best dense and MoE configuration fine-tuned"
$moelab sweep eval "$study/sparsity" --tasks wordnet-cloze prose-lastword --shots 0 5 \
  --limit "$task_items" --threads "$jobs" | grep --line-buffered -E '^\[[0-9]+/[0-9]+\]|^evaluated [0-9]+ runs'
$moelab sweep finetune "$study/sparsity" --task wordnet-cloze --steps "$ft_steps" --lr 3e-3 --limit "$ft_items" --replicates \
  --threads "$jobs"

stage 6 "fits, figures and the report"
$moelab report "$study" --out "$study/report"
echo "quickstart: done in $(( ($(date +%s) - start) / 60 )) min; open $root/$study/report/index.html in a browser"
