#!/usr/bin/env bash
# A failure on any rank ends the whole job (docs/distributed.md, "When a rank fails"): each case runs
# `mpirun -np 2 moelab train` as a user would and checks that the job exits non-zero within 15 s of the failure,
# with the reason on stderr.
#   1. rank 0 alone cannot create train.out_dir (start-up, before any collective);
#   2. rank 1 alone throws an error mid-training (the MOELAB_TEST_FAULT hook);
#   3. rank 1 crashes with SIGSEGV mid-training (the fatal-signal handler);
#   4. rank 1 is killed with SIGKILL from outside, as the out-of-memory killer would.
# Usage: tests/dist_failure.sh MOELAB MPIEXEC     (CTest: mpirun)
#        tests/dist_failure.sh MOELAB srun        (by hand inside a Slurm allocation or on a Slurm node:
#                                                  srun --mpi=pmix -n 2; docs/distributed.md has its figures)
set -uo pipefail
moelab="$1"
mpiexec="$2"
if [[ "$(basename "$mpiexec")" == srun ]]; then
  launch=("$mpiexec" --mpi=pmix -n 2 --overcommit)
  rank_var=SLURM_PROCID
else
  launch=("$mpiexec" -np 2)
  rank_var=OMPI_COMM_WORLD_RANK
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/moelab_dist_failure.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=PASSIVE
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
limit=15
failures=0

# A byte-level corpus from the repository's docs: a small model trains on it at once.
"$moelab" data bytes "$(dirname "$0")/../docs" --out "$work/train.bin" > /dev/null || exit 1
train=(train --set model.vocab_size=256 --set model.d_model=32 --set model.n_layers=1 --set model.n_heads=2
       --set model.seq_len=32 --set train.batch_size=4 --set train.steps=100000 --set train.threads=1
       --set train.log_every=5 --set train.peak_flops=1e11 --set "data.train_path=$work/train.bin")

now() { echo $(( $(date +%s%N) / 1000000 )); }  # milliseconds
elapsed() { echo $(( $(now) - $1 )); }

# check NAME RC MILLISECONDS STDERR_FILE PATTERN: non-zero, in time, and the reason on stderr.
check() {
  local name="$1" rc="$2" ms="$3" err="$4" pattern="$5"
  local seconds="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
  local ok=1
  if [[ "$rc" == 0 ]]; then echo "FAIL $name: the job exited 0"; ok=0; fi
  if [[ "$rc" == 124 ]]; then echo "FAIL $name: the job was still running after 60 s (it hangs)"; ok=0; fi
  if (( ms >= limit * 1000 )); then echo "FAIL $name: the job took ${seconds}s to end (limit ${limit}s)"; ok=0; fi
  if ! grep -Eq "$pattern" "$err"; then
    echo "FAIL $name: stderr does not say /$pattern/:"; sed 's/^/  | /' "$err"; ok=0
  fi
  if (( ok )); then printf "ok   %-34s exit %3s after %5.2f s: %s\n" "$name" "$rc" "$seconds" "$(grep -Eom1 "$pattern" "$err")"; fi
  (( ok )) || failures=$((failures + 1))
}

# 1. rank 0 alone: an out_dir it cannot create (rank 1 never touches it).
start=$(now)
timeout 60 "${launch[@]}" "$moelab" "${train[@]}" --set train.out_dir=/proc/nope/run > "$work/out1" 2> "$work/err1"
rc=$?
check "rank 0 fails at start-up" "$rc" "$(elapsed "$start")" "$work/err1" \
      "rank 0 of 2: error: train\.out_dir '/proc/nope/run' cannot be created"

# 2, 3. rank 1 alone, mid-training (step 10, a fraction of a second in): an error, then a crash. The clock runs
# from the job's start, which is stricter than from the fault.
for kind in error segv; do
  rm -rf "$work/run"
  start=$(now)
  MOELAB_TEST_FAULT="1:10:$kind" timeout 60 "${launch[@]}" "$moelab" "${train[@]}" \
      --set "train.out_dir=$work/run" > "$work/out_$kind" 2> "$work/err_$kind"
  rc=$?
  ms=$(elapsed "$start")
  pattern="rank 1 of 2: error: MOELAB_TEST_FAULT: failure injected on rank 1 at step 10"
  [[ $kind == segv ]] && pattern="rank 1 of 2: fatal signal SIGSEGV"
  # metrics.jsonl is flushed every train.log_every = 5 steps: step 5 shows that training ran before the fault
  if ! grep -q '"step":5,' "$work/run/metrics.jsonl" 2>/dev/null; then
    echo "FAIL rank 1 $kind: training never reached step 5"; failures=$((failures + 1))
  fi
  check "rank 1 fails mid-training ($kind)" "$rc" "$ms" "$work/err_$kind" "$pattern"
done

# 4. rank 1 killed from outside with SIGKILL once training runs.
rm -rf "$work/run"
tag="dist_failure_$$"
MOELAB_TEST_TAG="$tag" timeout 60 "${launch[@]}" "$moelab" "${train[@]}" --set "train.out_dir=$work/run" \
    > "$work/out_kill" 2> "$work/err_kill" &
job=$!
for _ in $(seq 200); do
  grep -q '"step":10,' "$work/run/metrics.jsonl" 2>/dev/null && break
  sleep 0.1
done
victim=""
for pid in $(pgrep -x moelab); do
  env_of=$(cat "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n')
  if grep -qx "MOELAB_TEST_TAG=$tag" <<< "$env_of" && grep -qx "$rank_var=1" <<< "$env_of"; then victim=$pid; fi
done
if [[ -z "$victim" ]]; then
  echo "FAIL rank 1 killed: no rank-1 moelab process of this job found"; failures=$((failures + 1)); kill "$job"
else
  start=$(now)
  kill -9 "$victim"
  wait "$job"
  rc=$?
  check "rank 1 killed with SIGKILL" "$rc" "$(elapsed "$start")" "$work/err_kill" "(rank 1 .*exited on signal 9 \(Killed\)|task 1: Killed)"
fi

echo "$((4 - failures < 0 ? 0 : 4 - failures)) passed, $failures failed"
(( failures == 0 ))
