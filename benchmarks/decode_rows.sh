#!/usr/bin/env bash
# The decode rows of docs/benchmarks.md ("`bench` decode model"): one `bench --json` per row, then a
# line "NAME measured predicted error". Run from the repository root.
#   DEVICE=cpu  OUT=decode-cpu  bash benchmarks/decode_rows.sh          # 2 threads, batch 1 unless listed
#   DEVICE=cuda OUT=decode-cuda bash benchmarks/decode_rows.sh
# ROWS="gpt2 gemma-2b-full" limits the run to those names; ROW_LIMIT (seconds, default 300) bounds each.
set -u
DEVICE="${DEVICE:-cpu}"
OUT="${OUT:-decode-$DEVICE}"
mkdir -p "$OUT"
rows=(
  "llama-3-8b-bf16|llama-3-8b --layers 2"
  "llama-3-8b-fp32|llama-3-8b --layers 2 --dtype fp32"
  "7b|7b --layers 2"
  "mistral-7b|mistral-7b --layers 2"
  "mixtral-8x7b|mixtral-8x7b --layers 1"
  "gpt2-L2|gpt2 --layers 2"
  "gemma-2b-L2|gemma-2b --layers 2"
  "peer-b2|benchmarks/specs/decode-peer.yaml --dtype fp32 --batch 2"
  "peer-b1|benchmarks/specs/decode-peer.yaml --dtype fp32"
  "mamba-2.8b-L2|mamba-2.8b --layers 2"
  "hyena-153m-L2|hyena-153m --layers 2"
  "s4d-lm-L2|s4d-lm --layers 2"
  "gpt2-full|gpt2"
  "gemma-2b-full|gemma-2b"
  "mamba-2.8b-full|mamba-2.8b --warmup 0 --iters 1"
)
for row in "${rows[@]}"; do
  name="${row%%|*}"; args="${row#*|}"
  if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then continue; fi
  # shellcheck disable=SC2086  # args is a word list
  timeout "${ROW_LIMIT:-300}" python3 -m archplan.cli bench $args --device "$DEVICE" --seq 128 --decode-tokens 8 --json \
    > "$OUT/$name.json" 2> "$OUT/$name.err" || { echo "$name failed: $(tail -1 "$OUT/$name.err")"; continue; }
  python3 -c "import json, sys; d = json.load(open(sys.argv[1]))['decode']
print(sys.argv[2], f\"{d['ms_per_step']:.1f} ms a step measured, {d['predicted_ms_per_step']:.1f} ms predicted, {100 * d['error']:+.1f}%\")" \
    "$OUT/$name.json" "$name"
done
