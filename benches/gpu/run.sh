#!/usr/bin/env bash
# On the GPU machine, from the repository root, after benches/gpu/pack.sh here (device tool:
# carry [".gpu"]):
#   bash benches/gpu/run.sh tests            every test binary (TESSERA_REQUIRE_GPU=1), 280 s each at most
#   bash benches/gpu/run.sh tests-quick      the same without the NVRTC compile check of every module
#                                            (~100 s less; run it here instead: cargo test --release
#                                            --all-features --test cuda every_kernel, with libnvrtc)
#   bash benches/gpu/run.sh bench [ARGS]     bench-attention --no-wgpu ARGS (default --dense)
#   bash benches/gpu/run.sh flash [ARGS]     tessera's ratio to SDPA flash on every benchmark shape (ARGS:
#                                            bench filters, e.g. --shape 48,16384,64 --recipe nvfp4)
#   bash benches/gpu/run.sh profile [ARGS]   GPU time per kernel (ncu) of bench-attention --quick ARGS
#                                            (PROFILE_BIN=bench-prev: the A/B's other binary)
#   bash benches/gpu/run.sh stalls [ARGS]    ncu warp stalls of one attention launch, per SASS
#                                            instruction too ($OUT/stalls-*.csv; summary by
#                                            benches/gpu/stalls.py; STALLS_BIN=bench-prev: the
#                                            A/B's other binary; STALLS_SKIP=N: the attention
#                                            launch after N others, default 1; STALLS_TAG: a
#                                            suffix for the CSV names, to keep several)
#   bash benches/gpu/run.sh configs [ARGS]   bench-attention --no-wgpu --dense ARGS under four launch
#                                            shapes (TESSERA_MMA_CONFIG), two rounds
#   bash benches/gpu/run.sh sparse [ARGS]    skip-softmax and N:M rows (bench-attention --skip, --nm;
#                                            default --shape 24,16384,128), this binary and bench-prev
#   bash benches/gpu/run.sh ab [ARGS]        bench-attention vs bench-prev (pack.sh --prev REV; the table:
#                                            python3 benches/gpu/ab_table.py $OUT/run.log),
#                                            AB_ROUNDS (3) alternating rounds, --no-wgpu ARGS (default
#                                            --dense); AB_BINS: the binaries of .gpu/bin to alternate
#                                            (default "bench-attention bench-prev")
#   bash benches/gpu/run.sh envab VAR [ARGS]  the same A/B in one binary: VAR=1 (as "bench-attention")
#                                            against VAR=0 (as "bench-prev"), e.g. TESSERA_KPERM
#                                            with --nm, TESSERA_SCRATCH_POOL; ab_table.py reads it too
#   bash benches/gpu/run.sh kab [ARGS]       the same A/B in one binary over kernel sources: KAB_DIRS, directories
#                                            holding the kernels/ files themselves (e.g. .gpu/k/NAME/attention_mma.cu ...: a copy with an edit;
#                                            "built-in" for the binary's own), each run with
#                                            TESSERA_KERNELS_DIR; ab_table.py's baseline is the last one
# Several may follow each other: bash benches/gpu/run.sh tests bench --shape 24,4096,128
# Everything printed is also kept in $OUT/run.log when the device tool's $OUT is set (its output
# tail is cut at 12,000 characters), with each test binary's whole log beside it.
set -uo pipefail
if [ -n "${OUT:-}" ] && [ -z "${RUN_SH_LOGGED:-}" ]; then
  export RUN_SH_LOGGED=1
  bash "$0" "$@" 2>&1 | tee -a "$OUT/run.log"
  exit "${PIPESTATUS[0]}"
fi
[ -d .gpu/bin ] || (cd .gpu && tar -xJf bins.tar.xz)
source .gpu/env.sh
export TESSERA_CACHE_DIR=${TESSERA_CACHE_DIR:-/tmp/tessera-cache}
# A step's ARGS run up to the next step name.
is_step() { case "$1" in tests | tests-quick | bench | flash | profile | stalls | ab | envab | kab | configs | sparse) return 0 ;; *) return 1 ;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    tests | tests-quick)
      skip=(); [ "$1" = tests-quick ] && skip=(--skip every_kernel)
      for t in .gpu/bin/test-*; do
        n=$(basename "$t")
        timeout 280 "$t" --include-ignored --nocapture "${skip[@]}" > "/tmp/$n.log" 2>&1
        echo "$n rc $?"
        [ -n "${OUT:-}" ] && cp "/tmp/$n.log" "$OUT/$n.log"
        grep -E "test result|FAILED|panicked|worst|agree with|compiled for" "/tmp/$n.log" | head -24
      done ;;
    bench)
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      [ ${#args[@]} -eq 0 ] && args=(--dense)
      timeout 300 .gpu/bin/bench-attention --no-wgpu "${args[@]}" 2>/dev/null | grep "| cuda" ;;
    profile)
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      timeout 300 ncu --metrics gpu__time_duration.sum --csv ".gpu/bin/${PROFILE_BIN:-bench-attention}" --no-wgpu --quick "${args[@]}" 2>&1 |
        python3 benches/gpu/kernel_times.py ;;
    stalls)
      # Where the attention kernel's warps wait: ncu's warp-state and scheduler sections and
      # per-SASS-instruction stall samples of one launch (CSV under $OUT, summary printed).
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      rep=/tmp/stalls
      timeout 300 ncu -k regex:attention_mma -s "${STALLS_SKIP:-1}" -c 1 --section WarpStateStats --section SchedulerStats \
        --section SourceCounters --section ComputeWorkloadAnalysis -f -o "$rep" \
        ".gpu/bin/${STALLS_BIN:-bench-attention}" --no-wgpu --quick "${args[@]}" > /dev/null 2>&1
      ncu -i "$rep.ncu-rep" --page details --csv > "${OUT:-/tmp}/stalls${STALLS_TAG:-}-details.csv" 2>&1
      ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "${OUT:-/tmp}/stalls${STALLS_TAG:-}-sass.csv" 2>&1
      python3 benches/gpu/stalls.py "${OUT:-/tmp}/stalls${STALLS_TAG:-}-sass.csv" 25 "${OUT:-/tmp}/stalls${STALLS_TAG:-}-details.csv" ;;
    ab)
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      [ ${#args[@]} -eq 0 ] && args=(--dense)
      for round in $(seq "${AB_ROUNDS:-3}"); do
        for bin in ${AB_BINS:-bench-attention bench-prev}; do
          echo "== round $round $bin"
          timeout 200 ".gpu/bin/$bin" --no-wgpu "${args[@]}" 2>/dev/null | grep -E "^\| (cuda|nm-softmax|skip-softmax)"
        done
      done ;;
    envab)
      var="$2"; shift
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      [ ${#args[@]} -eq 0 ] && args=(--dense)
      for round in $(seq "${AB_ROUNDS:-3}"); do
        for val in 1 0; do
          if [ "$val" = 1 ]; then echo "== round $round bench-attention ($var=1)"; else echo "== round $round bench-prev ($var=0)"; fi
          env "$var=$val" timeout 200 .gpu/bin/bench-attention --no-wgpu "${args[@]}" 2>/dev/null | grep -E "^\| (cuda|nm-softmax|skip-softmax)"
        done
      done ;;
    kab)
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      [ ${#args[@]} -eq 0 ] && args=(--dense)
      # (a directory without the kernel files would fall back to the built-in ones, silently
      # under the grep below: refuse it)
      for dir in ${KAB_DIRS:?KAB_DIRS: kernel directories to alternate}; do
        [ "$dir" = built-in ] || [ -f "$dir/attention_mma.cu" ] || { echo "kab: no $dir/attention_mma.cu" >&2; exit 1; }
      done
      for round in $(seq "${AB_ROUNDS:-3}"); do
        for dir in $KAB_DIRS; do
          echo "== round $round $(basename "$dir")"
          if [ "$dir" = built-in ]; then env -u TESSERA_KERNELS_DIR timeout 200 .gpu/bin/bench-attention --no-wgpu "${args[@]}"
          else TESSERA_KERNELS_DIR="$dir" timeout 200 .gpu/bin/bench-attention --no-wgpu "${args[@]}"; fi 2>/dev/null |
            grep -E "^\| (cuda|nm-softmax|skip-softmax)"
        done
      done ;;
    configs)
      # Launch shapes side by side (TESSERA_MMA_CONFIG), two rounds: default, three consumer
      # warpgroups, two, and two with two blocks per SM.
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      for round in 1 2; do
        for cfg in default 12,1,1,1,1 8,1,1,1,1 8,1,1,2,1; do
          if [ "$cfg" = default ]; then unset TESSERA_MMA_CONFIG; else export TESSERA_MMA_CONFIG=$cfg; fi
          echo "== $cfg round $round: $(timeout 100 .gpu/bin/bench-attention --no-wgpu --dense "${args[@]}" 2>/dev/null |
            grep '| cuda' | awk -F'|' '{printf "%s %s/%s %s  ", $3, $4, $5, $7}')"
        done
      done
      unset TESSERA_MMA_CONFIG ;;
    sparse)
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      [ ${#args[@]} -eq 0 ] && args=(--shape 24,16384,128)
      for bin in bench-attention bench-prev; do
        [ -x ".gpu/bin/$bin" ] || continue
        echo "== $bin"
        for mode in --skip --nm; do
          timeout 200 ".gpu/bin/$bin" --no-wgpu "$mode" "${args[@]}" 2>/dev/null | grep -E "^\| (skip|nm)-softmax"
        done
      done ;;
    flash)
      args=(); while [ $# -gt 1 ] && ! is_step "$2"; do args+=("$2"); shift; done
      timeout 400 python3 benches/peers.py .gpu/bin/bench-attention --flash-only -- --no-wgpu --dense "${args[@]}" ;;
    *) echo "run.sh: unknown step $1" >&2 ;;
  esac
  shift
done
