#!/usr/bin/env bash
# 4-bit quality as lm-evaluation-harness measures it (docs/perf/quality.md): a multiple-choice task made
# from held-out fortune text (each fortune's first half, its own second half among three other
# fortunes' second halves), run by lm-eval's local-completions model through `nibble openai` in front
# of a local cluster, once per model. Prints lm-eval's accuracy (and length-normalised accuracy) per
# model, and each model's agreement with the first model's choices (the full-precision reference).
#
#   tools/lm-eval-fortunes.sh MODEL [MODEL...]
#
# Environment: NIBBLE_BIN (default build/bin/nibble), FORTUNES (default Debian fortunes-min's
# /usr/share/games/fortunes/fortunes), DOCS (questions, default 400), PORT (default 5702; HTTP on
# PORT+1000), THREADS (default 2). Needs `pip install 'lm-eval[api]'`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: tools/lm-eval-fortunes.sh MODEL [MODEL...]" >&2; exit 2; }
bin="${NIBBLE_BIN:-$root/build/bin/nibble}"
fortunes="${FORTUNES:-/usr/share/games/fortunes/fortunes}"
port="${PORT:-5702}" http_port=$((${PORT:-5702} + 1000))
work="$(mktemp -d)"
gateway=""
stop_cluster() {
  [ -z "$gateway" ] || kill "$gateway" 2>/dev/null || true
  gateway=""
  NIBBLE_BIN="$bin" "$root/deploy/stop-local.sh" --endpoint "tcp://127.0.0.1:$port" --run-dir "$work/run" \
    >/dev/null 2>&1 || true
}
trap 'stop_cluster; rm -rf "$work"' EXIT

# The questions: fortunes of 8 to 60 words (the whole question fits the fortune models' 128 tokens),
# split in half by words.
python3 - "$fortunes" "${DOCS:-400}" "$work/fortunes.jsonl" <<'PY'
import json, random, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
fortunes = [" ".join(f.split()) for f in text.split("\n%\n")]
fortunes = [f for f in fortunes if 8 <= len(f.split()) <= 60]
rng = random.Random(0)
rng.shuffle(fortunes)
docs = fortunes[: int(sys.argv[2])]
halves = [(" ".join(f.split()[: len(f.split()) // 2]), " ".join(f.split()[len(f.split()) // 2 :])) for f in docs]
with open(sys.argv[3], "w") as out:
    for i, (context, ending) in enumerate(halves):
        others = rng.sample([h[1] for j, h in enumerate(halves) if j != i], 3)
        choices = others + [ending]
        rng.shuffle(choices)
        out.write(json.dumps({"context": context, "choices": choices, "gold": choices.index(ending)}) + "\n")
print(f"{len(docs)} questions from {len(fortunes)} fortunes of 8 to 60 words", file=sys.stderr)
PY
cat > "$work/nibble_fortunes.yaml" <<YAML
task: nibble_fortunes
dataset_path: json
dataset_kwargs:
  data_files:
    test: $work/fortunes.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
  - metric: acc_norm
YAML

i=0
for model in "$@"; do
  model="$(realpath "$model")"
  cat > "$work/cluster.yaml" <<YAML
model: { path: "$model" }
parallel: { tensor: 1, pipeline: 1 }
threads: ${THREADS:-2}
server: { listen: "tcp://127.0.0.1:$port" }
YAML
  endpoint="$(NIBBLE_BIN="$bin" "$root/deploy/launch-local.sh" --config "$work/cluster.yaml" --timeout 300 \
    --run-dir "$work/run")"
  "$bin" openai --endpoint "$endpoint" --port "$http_port" --threads 4 --tokenizer "$model" \
    2> "$work/openai.log" &
  gateway=$!
  for _ in $(seq 100); do grep -q listening "$work/openai.log" && break; sleep 0.1; done
  started=$(date +%s.%N)
  # The fortune models' context is 128 tokens: lm-eval keeps each request's last 127.
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python3 -m lm_eval --model local-completions \
    --model_args "model=nibble,base_url=http://127.0.0.1:$http_port/v1/completions,tokenizer_backend=remote,num_concurrent=4,max_retries=1,max_length=127" \
    --tasks nibble_fortunes --include_path "$work" --output_path "$work/out$i" --log_samples \
    > "$work/lm_eval$i.log" 2>&1 || { cat "$work/lm_eval$i.log" >&2; exit 1; }
  echo "$model $(python3 -c "import time; print(f'{time.time() - $started:.1f}')")" >> "$work/models"
  stop_cluster
  i=$((i + 1))
done

python3 - "$work" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
models = [line.rsplit(" ", 1) for line in open(os.path.join(work, "models")).read().splitlines()]
def choices(i):  # each question's chosen answer (highest loglikelihood), by doc id
    path = glob.glob(os.path.join(work, f"out{i}", "**", "samples_nibble_fortunes_*.jsonl"), recursive=True)[0]
    picks = {}
    for line in open(path):
        s = json.loads(line)
        lls = [float(r[0]) for r in s["filtered_resps"]]
        picks[s["doc_id"]] = lls.index(max(lls))
    return picks
def results(i):
    path = glob.glob(os.path.join(work, f"out{i}", "**", "results_*.json"), recursive=True)[0]
    return json.load(open(path))["results"]["nibble_fortunes"]
reference = choices(0)
print("| model | acc | acc_norm | same choice as the first | lm-eval wall s |")
print("|---|---|---|---|---|")
for i, (model, seconds) in enumerate(models):
    r, picks = results(i), choices(i)
    same = sum(picks[d] == reference[d] for d in reference) / len(reference)
    print(f"| {os.path.basename(model)} | {r['acc,none']:.4f} ± {r['acc_stderr,none']:.4f} | "
          f"{r['acc_norm,none']:.4f} ± {r['acc_norm_stderr,none']:.4f} | {same:.2%} | {seconds} |")
PY
