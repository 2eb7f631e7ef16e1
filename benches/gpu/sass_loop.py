#!/usr/bin/env python3
"""The attention kernel's hot loop in a CUBIN: its instruction count and opcode mix.

    python3 benches/gpu/sass_loop.py X.cubin [--list] [--taken I,J,...] [--nvdisasm PATH]

X.cubin from `examples/kernel_sass.rs` (no GPU needed). The loop is the shortest backward
branch of the `attention*` function whose body holds a tensor-core MMA (HGMMA/IGMMA/HMMA/IMMA):
the per-KV-tile loop. Static counts, not executed ones: a branch inside the loop (skip-softmax's
two paths, a masked tile) counts both sides. --list prints the loop with each instruction's
index and the labels; --taken I,J,... counts one path: the forward branches at those indices
taken, the instructions they jump over left out (e.g. the branch past the masking of a tile
that needs none, and past O's rescale when no row max moved: a full tile's path).
nvdisasm: PATH, else $NVDISASM, else on $PATH (`pip download --no-deps nvidia-cuda-nvdisasm`
has one; no toolkit needed).
"""
import collections
import os
import re
import shutil
import subprocess
import sys


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    tool = args[args.index("--nvdisasm") + 1] if "--nvdisasm" in args else os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not tool:
        sys.exit("sass_loop.py: no nvdisasm (--nvdisasm PATH, $NVDISASM, or on $PATH)")
    text = subprocess.run([tool, "-c", args[0]], capture_output=True, text=True, check=True).stdout
    ins, labels = attention_section(text.splitlines())
    loop = hot_loop((ins, labels))
    if loop is None:
        sys.exit("sass_loop.py: no loop with an MMA in the attention kernel")
    start, end = loop
    body = list(range(start, end + 1))
    if "--taken" in args:
        skipped = set()
        for i in args[args.index("--taken") + 1].split(","):
            j = start + int(i)
            m = re.search(r"BRA\s.*?(\.L_x_\d+)", ins[j]) if j <= end else None
            target = labels.get(m.group(1)) if m else None
            if target is None or not j < target <= end + 1:
                sys.exit(f"sass_loop.py: {i} is no forward branch within the loop")
            skipped.update(range(j + 1, target))
        body = [k for k in body if k not in skipped]
        print(f"path with branches {args[args.index('--taken') + 1]} taken:", end=" ")
    mix = collections.Counter(opcode(ins[k]) for k in body)
    print(f"hot loop: {len(body)} instructions")
    print(" ".join(f"{op}:{n}" for op, n in mix.most_common()))
    if "--list" in args:
        names = {v: k for k, v in labels.items()}
        for k in body:
            if k in names:
                print(f"{names[k]}:")
            print(f"{k - start:5d}  {ins[k]}")


def attention_section(lines):
    """The instructions of the first `.text.attention*` section, with its labels' positions."""
    start = next((i for i, l in enumerate(lines) if re.match(r"\s*\.text\.attention\w*:", l)), None)
    if start is None:
        sys.exit("sass_loop.py: no attention kernel in this CUBIN")
    ins, labels = [], {}
    for line in lines[start + 1:]:
        if re.match(r"\s*\.(text\.|section)", line):
            break
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
    return ins, labels


def hot_loop(section):
    """(first, last) index of the loop's instructions."""
    ins, labels = section
    best = None
    for j, t in enumerate(ins):
        m = re.search(r"BRA\s.*?(\.L_x_\d+)", t)
        s = labels.get(m.group(1)) if m else None
        if s is not None and s <= j and any(re.search(r"[HI]GMMA|[HI]MMA", x) for x in ins[s:j + 1]):
            if best is None or j - s < best[1] - best[0]:
                best = (s, j)
    return best


def opcode(t):
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]


if __name__ == "__main__":
    main()
