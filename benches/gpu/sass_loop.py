#!/usr/bin/env python3
"""The attention kernel's hot loop in a CUBIN: its instruction count and opcode mix.

    python3 benches/gpu/sass_loop.py X.cubin [--list] [--nvdisasm PATH]

X.cubin from `examples/kernel_sass.rs` (no GPU needed). The loop is the shortest backward
branch of the `attention*` function whose body holds a tensor-core MMA (HGMMA/IGMMA/HMMA/IMMA):
the per-KV-tile loop. Static counts, not executed ones: a branch inside the loop (skip-softmax's
two paths, a masked tile) counts both sides. nvdisasm: PATH, else $NVDISASM, else on $PATH
(`pip download --no-deps nvidia-cuda-nvdisasm` has one; no toolkit needed).
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
    body = hot_loop(attention_section(text.splitlines()))
    if body is None:
        sys.exit("sass_loop.py: no loop with an MMA in the attention kernel")
    mix = collections.Counter(opcode(t) for t in body)
    print(f"hot loop: {len(body)} instructions")
    print(" ".join(f"{op}:{n}" for op, n in mix.most_common()))
    if "--list" in args:
        print("\n".join(body))


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
    ins, labels = section
    best = None
    for j, t in enumerate(ins):
        m = re.search(r"BRA\s.*?(\.L_x_\d+)", t)
        s = labels.get(m.group(1)) if m else None
        if s is not None and s <= j and any(re.search(r"[HI]GMMA|[HI]MMA", x) for x in ins[s:j + 1]):
            if best is None or j - s < best[1] - best[0]:
                best = (s, j)
    return ins[best[0]:best[1] + 1] if best else None


def opcode(t):
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]


if __name__ == "__main__":
    main()
