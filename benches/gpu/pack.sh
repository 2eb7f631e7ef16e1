#!/usr/bin/env bash
# Stage everything one GPU session needs into .gpu/ (run from the repository root):
# ../shared/device/stage.sh's test binaries and Vulkan loader and the bench binary, compressed
# (what travels to the device is limited to 64 MiB; the tracked files travel too, so
# benches/gpu/run.sh and the Python peers are there already).
#   benches/gpu/pack.sh [--lean] [--prev REV]
#     --lean: only the CUDA-side test binaries, not shaders, formats_vs_crates, accuracy, api,
#             tessera (nor kernel_sass, which needs no GPU)
#     --prev REV: also the bench binary of commit REV as bench-prev (built in a worktree under
#             /tmp), for same-run A/B: `bash benches/gpu/run.sh ab ARGS` on the GPU machine
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
lean=0 prev=""
while [ $# -gt 0 ]; do
  case "$1" in
    --lean) lean=1 ;;
    --prev) prev="$2"; shift ;;
    *) echo "pack.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
../shared/device/stage.sh > /tmp/stage.log 2>&1 || { tail -20 /tmp/stage.log; exit 1; }
exe=$(cargo bench --bench attention --no-run --all-features 2>&1 | grep Executable | sed 's/.*(\(.*\))/\1/')
cp "$exe" .gpu/bin/bench-attention
if [ -n "$prev" ]; then
  wt=/tmp/tessera-prev
  git worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"
  git worktree add --detach "$wt" "$prev" > /dev/null
  pexe=$(cd "$wt" && CARGO_TARGET_DIR=/tmp/tessera-prev-target cargo bench --bench attention --no-run --all-features 2>&1 |
    grep Executable | sed 's/.*(\(.*\))/\1/')
  cp "$pexe" .gpu/bin/bench-prev
  git worktree remove --force "$wt"
fi
strip .gpu/bin/* 2>/dev/null || true
if [ "$lean" = 1 ]; then
  (cd .gpu/bin && rm -f test-shaders test-formats_vs_crates test-accuracy test-api test-tessera zz_features kernel_sass)
fi
(cd .gpu && tar -cf - bin | xz -T4 -6 > bins.tar.xz && rm -rf bin)
du -sh .gpu
