#!/usr/bin/env bash
# One lease: tp x pp layouts on random weights in the Llama-3.1-8B shape (issues 5, 7 and 8), each against
# tp=1 on one GPU of the same machine: greedy agreement, batch-1 latency, offline throughput (with the first
# stage's idle fraction for pp > 1), and a table of all of it at the end.
#   usage: scripts/device_layouts.sh "1x1 2x1 1x2 2x2"    (TPxPP; 1x1 is the baseline the others compare to)
# Run from the repo root with .whl carried (scripts/device_env.sh says what it holds). Results land in $OUT/results.tgz.
set -u
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv
git log -1 --format=%h 2>/dev/null || true
LAYOUTS=${1:-"1x1 2x1"}
for layout in $LAYOUTS; do
  tp=${layout%x*} pp=${layout#*x}
  echo "=== tp $tp x pp $pp"
  [ "$layout" != 1x1 ] && python3 scripts/greedy_agreement.py $L --baseline tp_size=1 \
    --candidate tp_size=$tp pp_size=$pp --output-json $OUT/agreement_$layout.json 2>&1 | grep -E '"agreement"|Error'
  python3 -m gridserve.cli bench latency $L --tp $tp --pp $pp --input-len 256 --output-len 128 --num-runs 3 \
    --no-show-progress --output-json $OUT/latency_$layout.json 2>&1 | tee $OUT/latency_$layout.log | grep -E "TTFT|TPOT|rror"
  python3 -m gridserve.cli bench offline $L --tp $tp --pp $pp --num-prompts 64 --min-input-len 100 \
    --max-input-len 512 --min-output-len 100 --max-output-len 512 --no-show-progress --log-level info \
    --output-json $OUT/offline_$layout.json > $OUT/offline_$layout.log 2>&1
  grep -E "tok/s|idle|rror" $OUT/offline_$layout.log | grep -v "decode batch"
done
python3 scripts/layouts_table.py $OUT $LAYOUTS | tee $OUT/table.md
