#!/usr/bin/env python3
"""The peer for `nibble bench-spec --peer`: llama.cpp's own speculative decoding (its
`llama-speculative` program) on the same target, draft, prompt, k, token count and threads, and
its plain decoding of both models (`llama-bench`), so that llama.cpp's speedup is measured on the
same machine in the same run as Nibble's. The programs come from tools/build-llama-cpp.sh.
Prints one JSON object (medians over --repetitions); {"error": ...} and exit 3 when the programs
are missing, exit 1 when they fail."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys


def fail(message, code):
    print(json.dumps({"error": message}))
    sys.exit(code)


def run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        fail(f"{os.path.basename(command[0])} exited {done.returncode}: {' | '.join(tail)}", 1)
    return done.stdout + done.stderr


def field(pattern, text, what):
    match = re.search(pattern, text)
    if not match:
        fail(f"llama-speculative printed no '{what}'", 1)
    return match.groups()


parser = argparse.ArgumentParser()
parser.add_argument("--bin", required=True, help="folder with llama-speculative and llama-bench")
parser.add_argument("--model", required=True)
parser.add_argument("--draft", required=True)
parser.add_argument("--prompt", required=True)
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--gen-tokens", type=int, required=True)
parser.add_argument("--draft-tokens", type=int, required=True)
parser.add_argument("--repetitions", type=int, default=1)
args = parser.parse_args()

speculative_bin = os.path.join(args.bin, "llama-speculative")
bench_bin = os.path.join(args.bin, "llama-bench")
for path in (speculative_bin, bench_bin):
    if not os.access(path, os.X_OK):
        fail(f"{path} not found (build it with tools/build-llama-cpp.sh)", 3)

plain, draft_alone, spec = [], [], []
drafted = accepted = 0
commit = ""
for _ in range(args.repetitions):
    bench = json.loads(run([bench_bin, "-o", "json", "-m", args.model, "-m", args.draft, "-p", "0",
                            "-n", str(args.gen_tokens), "-t", str(args.threads), "-r", "1"]))
    plain.append(bench[0]["avg_ts"])
    draft_alone.append(bench[1]["avg_ts"])
    commit = bench[0].get("build_commit", "")
    out = run([speculative_bin, "-m", args.model, "-md", args.draft, "-p", args.prompt,
               "-n", str(args.gen_tokens), "--spec-draft-n-max", str(args.draft_tokens),
               "-t", str(args.threads), "-td", str(args.threads), "--temp", "0", "-c", "1024",
               "-s", "1"])
    tokens, seconds = field(r"decoded\s+(\d+) tokens in\s+([0-9.]+) seconds", out, "decoded")
    spec.append(int(tokens) / float(seconds))
    drafted += int(field(r"n_drafted\s*=\s*(\d+)", out, "n_drafted")[0])
    accepted += int(field(r"n_accept\s*=\s*(\d+)", out, "n_accept")[0])

print(json.dumps({
    "name": "llama.cpp",
    "build_commit": commit,
    "plain_tokens_per_second": statistics.median(plain),
    "draft_alone_tokens_per_second": statistics.median(draft_alone),
    "speculative_tokens_per_second": statistics.median(spec),
    "drafted": drafted,
    "accepted": accepted,
    "acceptance_rate": accepted / drafted if drafted else 0.0,
}))
