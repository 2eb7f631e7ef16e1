#!/usr/bin/env bash
# Stage everything one GPU session needs into .gpu/ (run from the repository root):
# ../shared/device/stage.sh's test binaries and Vulkan loader and the bench binary, compressed
# (what travels to the device is limited to 64 MiB; the tracked files travel too, so
# benches/gpu/run.sh and the Python peers are there already).
#   benches/gpu/pack.sh [--lean]   (--lean: only the CUDA-side test binaries, not shaders,
#                                   formats_vs_crates, accuracy, api, tessera)
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
../shared/device/stage.sh > /tmp/stage.log 2>&1 || { tail -20 /tmp/stage.log; exit 1; }
exe=$(cargo bench --bench attention --no-run --all-features 2>&1 | grep Executable | sed 's/.*(\(.*\))/\1/')
cp "$exe" .gpu/bin/bench-attention
strip .gpu/bin/* 2>/dev/null || true
if [ "${1:-}" = "--lean" ]; then
  (cd .gpu/bin && rm -f test-shaders test-formats_vs_crates test-accuracy test-api test-tessera zz_features)
fi
(cd .gpu && tar -cf - bin | xz -T4 -6 > bins.tar.xz && rm -rf bin)
du -sh .gpu
