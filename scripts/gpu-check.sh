#!/usr/bin/env bash
# The GPU check of the cuda backend (issue 21), for a machine with an NVIDIA GPU (the device tool's H200): one script,
# one call. It
#   1. builds moelab for sm_90 into build-gpu/ (unless MOELAB_GPU_BUILD names a build or a carried pack:
#      scripts/pack-gpu.sh makes one here for an image that cannot build moelab),
#   2. runs the conformance suite (tests/test_conformance.cpp) on every backend, cuda included,
#   3. trains the quickstart's dense and MoE models 200 steps on the CPU and on the GPU (fp32, the same synthetic
#      tokens) and compares the loss curves,
#   4. benches on the GPU: tokens/s and MFU against the bf16 GEMM peak measured in the same run, for the dense
#      ~350M model and its two MoE twins of equal active size (configs/bench/gpu/), and the same shapes in PyTorch
#      eager on the same GPU (bench/torch_reference.py --device cuda).
# Everything it prints also goes to $OUT/gpu-check.log ($OUT: the device tool's output folder; else gpu-check-out/).
#
#   scripts/gpu-check.sh                 the whole check
#   MOELAB_GPU_CHECK_BACKEND=cpu MOELAB_GPU_CHECK_QUICK=1 scripts/gpu-check.sh
#                                        a dry run of the script's steps on the CPU, tiny (what CI-like machines can do)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
backend="${MOELAB_GPU_CHECK_BACKEND:-cuda}"
quick="${MOELAB_GPU_CHECK_QUICK:-0}"
build="${MOELAB_GPU_BUILD:-$root/build-gpu}"
echo "== gpu-check: backend $backend, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# ---- 1. build ----------------------------------------------------------------------------------------------------
if [[ ! -x "$build/moelab" ]]; then
  echo "== building into $build (sm_90)"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DMOELAB_BUILD_TESTS=ON -DMOELAB_BUILD_BENCH=ON
  ninja -C "$build" moelab train_bench test_conformance
fi
moelab="$build/moelab"
# A carried pack (scripts/pack-gpu.sh) brings the libraries the GPU image lacks.
[[ -d "$build/lib" ]] && export LD_LIBRARY_PATH="$build/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# ---- 2. conformance --------------------------------------------------------------------------------------------------
echo "== conformance suite (every backend this build has)"
conformance_status=0
"$build/tests/test_conformance" --gtest_brief=1 || conformance_status=$?
echo "conformance exit status: $conformance_status"

# ---- 3. the quickstart's models, CPU against GPU -------------------------------------------------------------------
steps=200
[[ "$quick" == 1 ]] && steps=6
data="$out/tokens.bin"
python3 - "$data" <<'PY'
import random, struct, sys
# Zipf-like ids over the quickstart's vocabulary with short-range repetition: learnable, reproducible, no download.
random.seed(7)
vocab, n = 8192, 2_000_000
weights = [1.0 / (i + 1) for i in range(vocab)]
ids = random.choices(range(vocab), weights=weights, k=n)
for i in range(3, n, 5):
    ids[i] = ids[i - 3]
open(sys.argv[1], "wb").write(struct.pack("<%dH" % n, *ids))
PY
common=(--config configs/quickstart.toml --set data.dir= --set "data.train_path=$data" --set "data.val_path=$data"
        --set "train.steps=$steps" --set train.warmup_steps=3 --set train.eval_every=0 --set train.eval_batches=4
        --set train.checkpoint_every=0 --set train.log_every=50 --set train.precision=fp32 --set train.peak_flops=1e12)
[[ "$quick" == 1 ]] && common+=(--set model.n_layers=1 --set model.d_model=64 --set model.n_heads=2 --set model.seq_len=32)
for model in dense moe; do
  extra=()
  [[ "$model" == moe ]] && extra=(--set moe.experts=8 --set moe.top_k=2)
  for where in cpu "$backend"; do
    rm -rf "$out/train-$model-$where"
    echo "== train $model on $where ($steps steps)"
    "$moelab" train "${common[@]}" "${extra[@]}" --set "train.backend=$where" --set train.threads=0 \
      --set "train.out_dir=$out/train-$model-$where" | tail -3
  done
done
python3 - "$out" "$backend" <<'PY'
import json, sys
out, backend = sys.argv[1], sys.argv[2]
def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]
print("loss curves, CPU against %s (fp32):" % backend)
for model in ("dense", "moe"):
    a = losses(f"{out}/train-{model}-cpu/metrics.jsonl")
    b = losses(f"{out}/train-{model}-{backend}/metrics.jsonl")
    diffs = [abs(x - y) for x, y in zip(a, b)]
    first = next((i + 1 for i, d in enumerate(diffs) if d > 1e-3), None)
    print(f"  {model:5s}: {len(a)} steps, loss {a[0]:.4f} -> {a[-1]:.4f} (cpu) / {b[-1]:.4f} ({backend}); max |diff| "
          f"{max(diffs):.2e}, first step above 1e-3: {first}")
PY

# ---- 4. speed on the GPU ---------------------------------------------------------------------------------------------
echo "== bench: moelab $backend bf16 against PyTorch eager on the same device"
bench_steps=10 warmup=3
[[ "$quick" == 1 ]] && bench_steps=1 warmup=0
shrink=()
[[ "$quick" == 1 ]] && shrink=(--set model.n_layers=1 --set model.d_model=64 --set model.n_heads=2 --set model.seq_len=32
                               --set model.d_ff=256 --set model.vocab_size=512 --set train.batch_size=2)
device=cuda
[[ "$backend" != cuda ]] && device=cpu
rows=()
for config in configs/bench/gpu/dense-1024.toml configs/bench/gpu/moe-1024-e8k2.toml configs/bench/gpu/moe-1024-g4.toml; do
  m=$("$build/bench/train_bench" --config "$config" --set "train.backend=$backend" --set train.threads=0 "${shrink[@]}" \
        --steps "$bench_steps" --warmup "$warmup" --peak-precision bf16 --json | grep '^RESULT' | cut -c8-)
  t=$(python3 bench/torch_reference.py --config "$config" --device "$device" --precision bf16 --steps "$bench_steps" \
        --warmup "$warmup" $(for s in "${shrink[@]}"; do [[ "$s" != --set ]] && printf -- '--set %s ' "$s"; done) \
        | grep '^RESULT' | cut -c8- || echo '{}')
  rows+=("$(basename "$config")|$m|$t")
done
python3 - "${rows[@]}" <<'PY'
import json, sys
print(f"{'config':22s} {'moelab tok/s':>12s} {'MFU (bf16 peak)':>15s} {'memory GiB':>10s} {'torch tok/s':>11s} "
      f"{'moelab/torch':>12s}")
for row in sys.argv[1:]:
    name, m, t = row.split("|")
    m, t = json.loads(m), json.loads(t or "{}")
    mfu = m["tokens_per_s"] * m["flops_per_token"] / m["peak_flops"] if m.get("peak_flops") else 0
    ratio = m["tokens_per_s"] / t["tokens_per_s"] if t.get("tokens_per_s") else float("nan")
    print(f"{name:22s} {m['tokens_per_s']:12.0f} {100 * mfu:14.1f}% {m.get('memory_mib', 0) / 1024:10.2f} "
          f"{t.get('tokens_per_s', float('nan')):11.0f} {ratio:11.2f}x")
    print(f"  (peak {m['peak_flops'] / 1e12:.1f} TFLOP/s bf16 on {m.get('backend')})")
PY
echo "== gpu-check done (conformance exit status $conformance_status); log: $out/gpu-check.log"
exit "$conformance_status"
