#!/usr/bin/env bash
# One lease on two GPUs of one host (issue 21): data, tensor, pipeline and expert parallelism against one GPU,
# on random weights in real shapes, with a table at the end (table_two_gpus.md in the results).
#   usage: scripts/device_two_gpus.sh [STEPS]   (any of: layouts allreduce dp moe; default all)
# Run from the repo root with .whl carried (scripts/device_env.sh says what it holds). Results land in $OUT/results.tgz.
set -u
# NVLink multicast stays off: a program that uses it can take the host's GPUs out of service (the device tool's
# KINDS.md). These are the image's defaults; set again here so no child process can start without them.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source scripts/device_env.sh
STEPS=${1:-"layouts allreduce dp moe"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
has() { bundle; [[ " $STEPS " == *" $1 "* ]]; }  # packs what the steps before wrote
if has layouts; then  # tp 2 and pp 2 on the 8B shape against tp 1: latency, offline, stage 0 idle fraction
  bash scripts/device_layouts.sh "1x1 2x1 1x2"
  # the agreement measure: the same first 32 tokens, tp 2 against tp 1 (bf16)
  python3 scripts/greedy_agreement.py $L --baseline tp_size=1 --candidate tp_size=2 --num-prompts 32 \
    --output-len 32 --output-json $OUT/agreement32_tp2.json 2>&1 | grep -E "identical|Error"
fi
if has allreduce; then  # what one all-reduce of a decode step costs, for the share of a tp 2 step
  python3 scripts/bench_allreduce.py --hidden 4096 --output-json $OUT/allreduce_L.json
  python3 scripts/bench_allreduce.py --hidden 2048 --output-json $OUT/allreduce_M.json
fi
serve() {  # $1: port, $2...: server flags; waits until it answers
  local port=$1; shift
  $GS serve "$@" --port $port --no-show-progress > $OUT/serve_$port.log 2>&1 &
  SERVER=$!
  for i in $(seq 300); do curl -sf localhost:$port/health > /dev/null && return; sleep 1; done
}
if has dp; then  # dp 2 against dp 1 at saturation; cache_aware against round_robin on shared prefixes
  for dp in 1 2; do
    serve 3010$dp $Q --dp $dp
    $GS bench serving --base-url http://127.0.0.1:3010$dp --dataset-name random --random-input-len 512 \
      --random-output-len 256 --num-prompts 2000 --disable-tqdm --output-file $OUT/serving_dp$dp.jsonl 2>&1 \
      | grep -E "Request throughput|Output token throughput"
    kill $SERVER; wait $SERVER
  done
  for method in cache_aware round_robin; do
    serve 30110 $Q --dp 2 --load-balance-method $method
    $GS bench serving --base-url http://127.0.0.1:30110 --dataset-name generated-shared-prefix --gsp-num-groups 32 \
      --gsp-prompts-per-group 16 --disable-tqdm --output-file $OUT/gsp_$method.jsonl 2>&1 \
      | grep -E "throughput|hit rate|Median TTFT"
    kill $SERVER; wait $SERVER
  done
fi
if has moe; then  # the 30B-A3B shape at tp 1, tp 2 and tp 2 x ep 2: batch-1 TPOT and offline
  for split in "1 1" "2 1" "2 2"; do
    set -- $split
    tag=tp$1_ep$2
    $GS bench latency $M --tp $1 --ep $2 --input-len 256 --output-len 128 --num-runs 3 --no-show-progress \
      --output-json $OUT/latency_M_$tag.json 2>&1 | grep -E "TPOT|rror"
    $GS bench offline $M --tp $1 --ep $2 --no-show-progress --output-json $OUT/offline_M_$tag.json 2>&1 \
      | grep -E "^gridserve|rror"
  done
fi
python3 scripts/two_gpus_table.py $OUT | tee $OUT/table_two_gpus.md
