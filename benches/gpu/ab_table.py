"""Median ms per (recipe, shape, causal) of `run.sh ab` output (stdin or a file, e.g.
$OUT/run.log), this binary (and any other of AB_BINS) against bench-prev (or, without one, the
last binary of AB_BINS), and the change: one line per row.
    python3 benches/gpu/ab_table.py run.log"""
import collections
import re
import statistics
import sys

times = collections.defaultdict(lambda: collections.defaultdict(list))
binary = None
seen = []  # binaries in the order the rounds ran them
for line in open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin:
    m = re.match(r"== round \d+ (\S+)", line)
    if m:
        binary = m.group(1)
        if binary not in seen:
            seen.append(binary)
        continue
    f = [x.strip() for x in line.split("|")]
    if binary and line.startswith("| cuda"):
        # | cuda | recipe | B,H,N,D | causal | sparsity | ms | TOPS | host µs |
        times[(f[2], f[3], f[4], f[5])][binary].append(float(f[6]))
    elif binary and line.startswith("| nm-softmax"):
        # | nm-softmax | recipe | B,H,N,D | dense / 2:4 / 4:8 | ms | TOPS |
        times[(f[2], f[3], "nm", f[4])][binary].append(float(f[5]))
    elif binary and line.startswith("| skip-softmax"):
        # | skip-softmax | recipe | B,H,N,D | λ | skipped | ms | TOPS |
        times[(f[2], f[3], "skip", f[4])][binary].append(float(f[6]))
base = "bench-prev" if "bench-prev" in seen else (seen[-1] if seen else "bench-prev")
others = sorted({b for by in times.values() for b in by if b != base}, key=lambda b: (b != "bench-attention", b))
for other in others:
    if len(others) > 1 or base != "bench-prev":
        print(f"== {other} against {base}")
    print(f"{'recipe':14s} {'B,H,N,D':16s} {'causal':6s} {'sparsity':8s} {'prev':>8s} {'new':>8s} {'change':>7s}  rounds")
    for key, by in sorted(times.items()):
        new, prev = by.get(other, []), by.get(base, [])
        if not new or not prev:
            continue
        a, b = statistics.median(prev), statistics.median(new)
        print(f"{key[0]:14s} {key[1]:16s} {key[2]:6s} {key[3]:8s} {a:8.3f} {b:8.3f} {100 * (b / a - 1):+6.1f}%  {len(prev)}/{len(new)}")
