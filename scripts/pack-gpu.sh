#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine whose image cannot build moelab (no oneDNN, SentencePiece,
# toml++, ... and no registry to install them from): the binaries built here for sm_90 and the shared libraries they
# load that are not part of the CUDA toolkit or the C runtime, into gpu-pack/ (git ignores it; the device tool
# carries it: run(carry=["gpu-pack"]), then `MOELAB_GPU_BUILD=gpu-pack scripts/gpu-check.sh` there).
#   scripts/pack-gpu.sh         build build-gpu/ (sm_90, no MPI) if needed, then pack
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-gpu"
pack="$root/gpu-pack"
if [[ ! -x "$build/moelab" ]]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DMOELAB_WITH_MPI=OFF \
        -DMOELAB_NATIVE=OFF -DMOELAB_BUILD_TESTS=ON -DMOELAB_BUILD_BENCH=ON
fi
ninja -C "$build" moelab train_bench test_conformance
rm -rf "$pack"
mkdir -p "$pack/bench" "$pack/tests" "$pack/lib"
cp "$build/moelab" "$pack/"
cp "$build/bench/train_bench" "$pack/bench/"
cp "$build/tests/test_conformance" "$pack/tests/"
# Libraries outside the C runtime and the CUDA toolkit (the GPU image has those).
for bin in "$pack/moelab" "$pack/bench/train_bench" "$pack/tests/test_conformance"; do
  ldd "$bin" | awk '/=>/ {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libcuda*|libcublas*|libcudart*|libgcc_s*) ;;
      *) cp -nL "$lib" "$pack/lib/" ;;
    esac
  done
done
du -sh "$pack"
echo "packed into $pack; on the GPU machine: LD_LIBRARY_PATH=gpu-pack/lib MOELAB_GPU_BUILD=gpu-pack scripts/gpu-check.sh"
