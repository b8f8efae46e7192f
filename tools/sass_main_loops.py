#!/usr/bin/env python3
"""The instruction mix of each kernel's main loop, from `cuobjdump -sass` on stdin.

Without a GPU this is how a kernel change is weighed: a W4A16 decode kernel whose main loop issues
N instructions per weight cannot stream weights faster than the SM's issue rate allows (4
warp-instructions a clock an SM), whatever the memory system does. The main loop is the innermost
backward branch's body with the most tensor-core (HMMA), FMA or dp4a (IDP) instructions.

usage: cuobjdump -sass OBJECT | tools/sass_main_loops.py [FUNCTION_SUBSTRING]
"""
import collections
import re
import subprocess
import sys


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def main():
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    rows = []
    for body in re.split(r"\n\s*Function : ", sys.stdin.read())[1:]:
        name = body.split("\n", 1)[0].strip()
        if pattern not in name:
            continue
        instrs = []
        for line in body.split("\n"):
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
            if m:
                instrs.append((int(m.group(1), 16), m.group(2).strip()))
        index = {addr: i for i, (addr, _) in enumerate(instrs)}
        best = None
        for i, (addr, text) in enumerate(instrs):
            m = re.search(r"BRA .*?0x([0-9a-f]+)", text)
            if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
                continue
            loop = instrs[index[int(m.group(1), 16)] : i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in loop)
            key = (ops["HMMA"] + ops["FFMA"] + ops["HFMA2"] + ops["IDP"], len(loop))
            if best is None or key > best[0]:
                best = (key, len(loop), ops)
        if best:
            rows.append((name, best[1], best[2]))
    for (name, count, ops), pretty in zip(rows, demangle([r[0] for r in rows])):
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(10))
        print(f"{count:5d}  {pretty}\n       {top}")


if __name__ == "__main__":
    main()
