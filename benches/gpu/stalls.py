"""Summary of `run.sh stalls`' CSVs: the scheduler and warp-state figures of the details page
(if given), each stall reason's share of all warp samples (ncu --page source --print-source
sass), then the instructions with the most samples and their three largest reasons.
    python3 benches/gpu/stalls.py $OUT/stalls-sass.csv [TOP [$OUT/stalls-details.csv]]"""
import collections
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
if len(sys.argv) > 3:
    for r in csv.reader(open(sys.argv[3])):
        # section, metric, unit, value (the details page's last four columns)
        if len(r) >= 15 and any(k in r[12] for k in ("Issue", "Eligible", "Active Warps", "Warp Cycles")):
            print(f"{r[12]:40s} {r[14]:>8s} {r[13]}")
rows = list(csv.reader(open(sys.argv[1])))
header = next(r for r in rows if "Address" in r and "Source" in r)
col = {h: i for i, h in enumerate(header)}
data = [r for r in rows[rows.index(header) + 1 :] if len(r) == len(header)]
reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
total = collections.Counter()
for r in data:
    for h in reasons:
        total[h] += num(r[col[h]])
samples = sum(total.values()) or 1.0
print(f"{len(data)} instructions, {samples:.0f} warp samples")
for h, v in total.most_common():
    if v:
        print(f"  {h[6:]:20s} {100 * v / samples:5.1f}%")
by_samples = sorted(data, key=lambda r: -num(r[col["Warp Stall Sampling (All Samples)"]]))
print(f"top {top} instructions by samples (share, executions, source, largest reasons):")
for r in by_samples[:top]:
    s = num(r[col["Warp Stall Sampling (All Samples)"]])
    why = sorted(((num(r[col[h]]), h[6:]) for h in reasons), reverse=True)[:3]
    print(f"  {100 * s / samples:5.1f}% {r[col['Instructions Executed']]:>12s}  {r[col['Source']][:60]:60s}",
          " ".join(f"{h}:{100 * v / samples:.1f}%" for v, h in why if v))
