"""Median GPU time per kernel name from `ncu --csv --metrics gpu__time_duration.sum` on stdin
(benches/gpu/run.sh profile)."""
import csv
import collections
import sys

scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "ns": 1e-3, "us": 1.0, "ms": 1e3}
times = collections.defaultdict(list)
sample = None
for row in csv.reader(sys.stdin):
    if len(row) >= 15 and sample is None:
        sample = row
    if len(row) < 15 or row[-3] != "gpu__time_duration.sum" or row[-2] not in scale:
        continue
    times[row[4].split("(")[0][:40]].append(float(row[-1].replace(",", "")) * scale[row[-2]])
for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
    v.sort()
    print(f"{name:40s} launches {len(v):4d}  median {v[len(v) // 2]:9.1f} us")
if not times:
    print("no gpu__time_duration rows; a row:", sample)
