#!/usr/bin/env bash
# One lease on one GPU: the one-GPU checks and benchmarks (issues 6, 19, 20, 24) on random weights in real shapes.
#   usage: scripts/device_speed.sh STEPS   (any of: imports kernels check latency ab offline serving serving-eager startup hf profile decodek offprof ttft prefill moe moe-offline moe-hf burst pdl rope fusedgemm gemmtiles gemmtiles8 gemm fp8 bigbs longctx sharedprefix serving-prefill serving-early serving-rate fewrows prefillgemm prefillgemm2 longprefill long32k solo moealign fewswap newkernels mlat decodek1 moeswap pipeline tiles pdlchain moetable prof32k startupab;
#   default: check latency offline serving startup)
# Run from the repo root with .whl carried (scripts/device_env.sh says what it holds). Results land in $OUT/results.tgz.
set -u
source scripts/device_env.sh
STEPS=${1:-"check latency offline serving startup"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
HEADS=${HEADS:-32:4 16:8 32:8}  # attention heads:KV heads of M, Q and L, for the decode kernel's own benchmarks
has() {  # packs what the steps before wrote; names each step taken, with the seconds since the start
  bundle; [[ " $STEPS " == *" $1 "* ]] || return 1; echo "== step $1 at ${SECONDS} s"
}
gpu_tests() {  # NAME PYTEST_ARGS...: tests on the GPU (not the interpreter), log in $OUT/NAME.log, failures shown
  local name=$1; shift
  TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider -rf "$@" 2>&1 | tee $OUT/$name.log \
    | grep -E "^FAILED|passed|failed" | cut -c1-400 | tail -12
}
ab_trees() {  # batch-1 TPOT of AB_MODELS in each tree named, one after the other (AB_ARGS: more bench latency flags)
  local root=$PWD tree m
  for tree in "$@"; do for m in ${AB_MODELS:-Q L M}; do
    (cd $tree && PYTHONPATH=$tree:$root/.site exec python3 -m gridserve.cli bench latency ${!m} --input-len 256 \
      --output-len 128 --num-runs 3 ${AB_ARGS:-} --no-show-progress --output-json $OUT/ab_${m}_$(basename $tree).json) 2>&1 \
      | grep -E "TPOT|rror" | sed "s/^/$m $(basename $tree): /"
  done; done
}
variant_tree() {  # a copy of this tree's gridserve at /tmp/NAME with FILE (under gridserve/) edited by sed's -e EXPRs
  local name=$1 file=$2; shift 2
  rm -rf /tmp/$name && mkdir -p /tmp/$name && cp -r gridserve /tmp/$name/ && sed -i "$@" /tmp/$name/gridserve/$file
}
offline_trees() {  # MODEL TREE...: bench offline (nano-vllm's workload) of one model in each tree named, in turn
  local root=$PWD m=$1 tree; shift
  for tree in "$@"; do
    (cd $tree && PYTHONPATH=$tree:$root/.site exec python3 -m gridserve.cli bench offline ${!m} --no-show-progress \
      --output-json $OUT/offline_${m}_$(basename $tree).json) 2>&1 | grep -E "tok/s|floor|KV|rror" \
      | sed "s/^/$(basename $tree): /"
  done
}
if has startupab; then  # start to ready, Q with graphs, alternating the tree and a copy whose ranks do not prepare
  # during the launcher's checks (prepare_during_checks off): three starts each
  variant_tree noprep scheduler/run.py -e 's/if device.type == "cuda":/if False:/'
  grep -c "if False:" /tmp/noprep/gridserve/scheduler/run.py
  ROOT=$PWD
  for run in 1 2 3; do for tree in $ROOT /tmp/noprep; do
    T0=$(date +%s.%N)
    (cd $tree && PYTHONPATH=$tree:$ROOT/.site exec python3 -m gridserve.cli serve $Q --port 30011 --no-show-progress) \
      > $OUT/serve_Q_$(basename $tree)_$run.log 2>&1 &
    SERVER=$!
    for i in $(seq 1200); do curl -sf localhost:30011/health > /dev/null && break; sleep 0.1; done
    echo "$(basename $tree) start $run: $(python3 -c "import time; print(round(time.time() - $T0, 1))") s;" \
      $(grep -oE "waited [0-9.]+ s|checks passed after [0-9.]+ s|server ready in [0-9.]+ s" $OUT/serve_Q_$(basename $tree)_$run.log | tr '\n' ' ')
    kill $SERVER; wait $SERVER
  done; done
fi
if has imports; then  # where the front end's and a scheduler's start-up imports go on this image
  python3 -X importtime -c "from gridserve.tokenizer import get_tokenizer; get_tokenizer('$TOK')" \
    2> $OUT/importtime_tokenizer.txt
  python3 -X importtime -c "import gridserve.scheduler.run" 2> $OUT/importtime_scheduler.txt
  for f in tokenizer scheduler; do echo "== $f"; sort -t'|' -k2 -n $OUT/importtime_$f.txt | tail -25 | cut -c1-110; done
fi
if has kernels; then  # the Triton kernels on the GPU against their references
  gpu_tests kernels tests/test_fused_ops.py tests/test_decode_gemm.py tests/test_triton_decode_attention.py \
    tests/test_triton_extend_attention.py tests/test_race_kernel.py tests/test_piecewise_graphs.py tests/test_kv_store.py \
    tests/test_pdl.py
fi
if has newkernels; then  # the kernels whose defaults changed last (MoE grouping, one-split decode, normed store)
  gpu_tests newkernels tests/test_fused_moe.py tests/test_triton_decode_attention.py tests/test_decode_gemm.py
fi
if has check; then  # eager normal loop vs CUDA graphs + overlap loop (the defaults)
  python3 scripts/greedy_agreement.py $Q --baseline disable_cuda_graph=true disable_overlap_schedule=true \
    --num-prompts 24 --output-json $OUT/agreement_graph.json > $OUT/agreement_graph.log 2>&1; tail -12 $OUT/agreement_graph.log
fi
if has latency; then
  for m in Q L; do
    $GS bench latency ${!m} --input-len 256 --output-len 128 --num-runs 3 --no-show-progress \
      --output-json $OUT/latency_$m.json 2>&1 | tee $OUT/latency_$m.log | grep -E "TTFT|TPOT|floor|rror|graphs|KV"
  done
  # four requests decoding in lockstep, as serving at concurrency 4 has them between prefills
  $GS bench latency $L --batch-size 4 --input-len 256 --output-len 128 --num-runs 3 --no-show-progress \
    --output-json $OUT/latency_L_bs4.json 2>&1 | tee $OUT/latency_L_bs4.log | grep -E "TTFT|TPOT|floor|rror"
fi
if has offline; then
  for mode in "" "--disable-overlap-schedule"; do
    $GS bench offline $Q $mode --no-show-progress --output-json $OUT/offline_Q${mode:+_normal}.json 2>&1 \
      | tee $OUT/offline_Q${mode:+_normal}.log | grep -vE "Warning|warn\(" | tail -8
  done
fi
serve_and_bench() {  # $1: tag, $2: extra server flags, $3: client runs "conc ratio out prompts [rate]" (conc -:
  # no limit; rate: Poisson arrivals a second), default the three below; one server for all of them
  local tag=$1 flags=$2 runs=${3:-"4 1 256 64;4 0 256 64;1 1 64 16"}
  $GS serve $L $flags --port 30010 --no-show-progress > $OUT/serve_L_$tag.log 2>&1 &
  SERVER=$!
  for i in $(seq 240); do curl -sf localhost:30010/health > /dev/null && break; sleep 1; done
  grep -E "captured" $OUT/serve_L_$tag.log | cut -c1-170
  local RUNS run conc ratio out n rate
  IFS=';' read -ra RUNS <<< "$runs"
  for run in "${RUNS[@]}"; do
    read -r conc ratio out n rate <<< "$run"
    echo "== $tag $conc/$( [ "$ratio" = 1 ] && echo fixed || echo random) lengths: max-concurrency $conc, out $out," \
      "$n prompts${rate:+, $rate requests/s}"
    $GS bench serving --base-url http://127.0.0.1:30010 --dataset-name random --random-input-len 256 \
      --random-output-len $out --random-range-ratio $ratio --num-prompts $n \
      $( [ "$conc" = - ] || echo --max-concurrency $conc ) ${rate:+--request-rate $rate} --disable-tqdm \
      --output-file $OUT/serving_L.jsonl 2>&1 | grep -E "TTFT|TPOT|Output token throughput"
  done
  curl -s localhost:30010/server_info > $OUT/server_info_$tag.json
  python3 -c "import json; s = json.load(open('$OUT/server_info_$tag.json'))['internal_states'][0]; \
print('late launch:', s['late_launch'])" 2>/dev/null
  kill $SERVER; wait $SERVER
}
if has serving; then  # ratio 1: every request 256/256, so arrivals come in lockstep; ratio 0: SGLang's default
  serve_and_bench graphs ""
  grep -E "prefill batch" $OUT/serve_L_graphs.log | tail -12 | cut -c1-170
fi
if has serving-rate; then  # Poisson arrivals, so they fall anywhere in a decode step (a closed loop's successors all
  # land at one phase of it): the default (late launch) against launching at once, random lengths
  for flag in "" "--disable-late-launch"; do serve_and_bench rate${flag:+_early} "$flag" "- 0 256 64 3"; done
fi
if has serving-prefill; then  # the same with one 256-token prompt a prefill batch: four prompts arriving together
  # then get their first tokens one after another (~6, 12, 18, 24 ms) instead of all at once after ~24 ms
  serve_and_bench prefill256 "--max-prefill-tokens 256"
fi
if has serving-early; then  # the same with --disable-late-launch (each decode step launched at once, so a new
  # request's prefill also queues behind the step after the one in flight), and the same server's normal loop for
  # reference; then offline Q with it, against `offline`'s default run
  serve_and_bench early "--disable-late-launch"
  serve_and_bench normal_loop "--disable-overlap-schedule"
  $GS bench offline $Q --disable-late-launch --no-show-progress --output-json $OUT/offline_Q_early.json 2>&1 \
    | tee $OUT/offline_Q_early.log | grep -vE "Warning|warn\(" | tail -3
fi
if has serving-eager; then  # the same without the prefill graphs
  serve_and_bench eager_prefill "--disable-piecewise-cuda-graph"
fi
if has startup; then  # start to ready, graphs included: first start (cold Triton cache) and a second one
  for run in 1 2; do
    T0=$(date +%s.%N)
    $GS serve $Q --port 30011 --no-show-progress > $OUT/serve_Q_$run.log 2>&1 &
    SERVER=$!
    for i in $(seq 1200); do curl -sf localhost:30011/health > /dev/null && break; sleep 0.1; done
    echo "startup to ready (0.6B, graphs), start $run: $(python3 -c "import time; print(round(time.time() - $T0, 1))") s"
    python3 scripts/startup_timeline.py $OUT/serve_Q_$run.log $T0
    kill $SERVER; wait $SERVER
  done
fi
if has hf; then
  $GS bench offline $Q --compare-transformers padded --num-prompts 64 --no-floor --no-show-progress \
    --output-json $OUT/offline_hf.json 2>&1 | tee $OUT/offline_hf.log | grep -vE "Warning|warn\(" | tail -8
fi
if has bigbs; then  # issue 20: 1,024 prompts, so decode batches pass the 256 that CUDA graphs cover by default
  for bs in 256 1024; do
    $GS bench offline $Q --num-prompts 1024 --cuda-graph-max-bs $bs --no-show-progress \
      --output-json $OUT/offline_Q_1024_bs$bs.json 2>&1 | tee $OUT/offline_Q_1024_bs$bs.log \
      | grep -vE "Warning|warn\(" | tail -5
  done
fi
if has decodek; then  # the decode attention kernel's bandwidth over launch settings, uniform and mixed contexts
  python3 scripts/bench_decode_kernel.py --contexts 512,2048 2>&1 | tee $OUT/decode_kernel.txt | grep -v Warning
  python3 scripts/bench_decode_kernel.py --batches 64,256 --contexts mixed:100-2048 --splits 1,2,4,8 2>&1 \
    | tee $OUT/decode_kernel_mixed.txt | grep -v Warning
fi
if has decodek1; then  # the same at batch 1 and 4 (latency, serving at concurrency 4) on M's, Q's and L's heads, at
  # bench latency's contexts (257-384) and longer: whether a small batch wants another launch than the default. With
  # --prep, as the models run it (q/k normed and rotated, the new K/V stored in the kernel): without, the twentieth
  # session's table favoured launches that lost in Qwen3-0.6B
  for heads in $HEADS; do set -- ${heads/:/ }
    python3 scripts/bench_decode_kernel.py --heads $1 --kv-heads $2 --batches 1,4 --contexts 256,384,1024,2048 \
      --splits 1,2,4,8,16,64 --warps 4 --top 4 --prep 2>&1 | grep -v Warning | tee $OUT/decode_small_$1_$2.txt \
      | grep -E "^batch|splits=|defaults" | grep -v "two kernels"
  done
fi
if has offprof; then  # device time of the offline workload by phase, and a kernel table at large batch
  python3 scripts/profile_scheduler.py $Q --offline --kernels --no-show-progress --top 30 2>&1 | grep -v Warning \
    | tee $OUT/profile_offline.txt
fi
if has ttft; then  # the scheduler's share of TTFT, in-process: 3 requests decode while new ones arrive
  python3 scripts/profile_scheduler.py $L --ttft --batch-size 4 --input-len 256 --no-show-progress 2>&1 \
    | grep -v Warning | tail -3
fi
if has prefill; then  # host time of an eager prefill step (batch 1, 256 tokens): cProfile over 20 of them
  python3 scripts/profile_scheduler.py $L --input-len 256 --output-len 1 --repeat 20 --no-show-progress --top 35 --kernels \
    2>&1 | grep -v Warning > $OUT/profile_prefill_L.txt; head -1 $OUT/profile_prefill_L.txt
fi
if has profile; then  # host time per decode step, in-process (scripts/profile_scheduler.py)
  for m in Q L; do for mode in "" "--disable-overlap-schedule"; do
    python3 scripts/profile_scheduler.py ${!m} $mode --batch-size 1 --no-show-progress --top 25 --kernels 2>&1 \
      | grep -v Warning > $OUT/profile_${m}${mode:+_normal}.txt; head -1 $OUT/profile_${m}${mode:+_normal}.txt
  done; done
  python3 scripts/profile_scheduler.py $Q --batch-size 64 --no-show-progress --top 25 2>&1 | grep -v Warning \
    > $OUT/profile_Q_bs64.txt; head -1 $OUT/profile_Q_bs64.txt
fi
moe_latency() {  # issue 19's batch-1 row (steps moe and mlat)
  $GS bench latency $M --input-len 256 --output-len 128 --num-runs 3 --no-show-progress \
    --output-json $OUT/latency_M.json 2>&1 | tee $OUT/latency_M.log | grep -E "TTFT|TPOT|floor|rror|graphs|KV"
}
if has moe; then  # issue 19: Qwen3-30B-A3B's shape: kernels, one layer, batch-1 latency, offline, agreement
  gpu_tests moe_tests tests/test_fused_moe.py
  python3 scripts/bench_moe_kernel.py --sweep 2>&1 | grep -v Warning | tee $OUT/moe_kernel.txt
  python3 scripts/profile_scheduler.py $M --batch-size 1 --no-show-progress --top 30 --kernels 2>&1 | grep -v Warning \
    > $OUT/profile_M.txt; head -1 $OUT/profile_M.txt
  moe_latency
fi
if has moetable; then  # issue 19's kernel table alone: the fused MoE kernel against the PyTorch path, one layer
  python3 scripts/bench_moe_kernel.py --batches 1,64,256 2>&1 | grep -v Warning | tee $OUT/moe_kernel.txt
fi
if has mlat; then
  moe_latency
fi
if has moe-offline; then  # random routers send most tokens to a few experts: the router's choice, then an even
  # spread (--moe-routing uniform), which reads the experts the floor counts (its kernel's tests on the GPU first)
  gpu_tests moe_routing_tests tests/test_moe_routing.py
  for routing in model uniform; do
    $GS bench offline $M --moe-routing $routing --no-show-progress --output-json $OUT/offline_M_$routing.json 2>&1 \
      | tee $OUT/offline_M_$routing.log | grep -vE "Warning|warn\(" | tail -6 | sed "s/^/$routing: /"
  done
  python3 scripts/greedy_agreement.py $M --baseline disable_cuda_graph=true disable_overlap_schedule=true \
    --num-prompts 24 --output-json $OUT/agreement_M.json > $OUT/agreement_M.log 2>&1; tail -4 $OUT/agreement_M.log
fi
if has moealign; then  # issue 19: the slots' grouping in three kernels (moe_align.py), against AB_BASE's tree if
  # named (the PyTorch ops): one MoE layer by batch (the sorted path above batch 8), then offline M, each tree in turn
  gpu_tests moealign_tests tests/test_fused_moe.py
  ROOT=$PWD
  for tree in ${AB_BASE:-} $PWD; do
    (cd $tree && PYTHONPATH=$tree:$ROOT/.site exec python3 $ROOT/scripts/bench_moe_kernel.py --batches 1,8,16,64,256) \
      2>&1 | grep -v Warning | tee $OUT/moe_layer_$(basename $tree).txt | sed "s/^/$(basename $tree): /"
  done
  python3 scripts/bench_moe_kernel.py --batches 16,64,256 --swap off 2>&1 | grep -v Warning \
    | tee $OUT/moe_layer_noswap.txt | sed "s/^/not swapped: /"  # the grouped GEMMs as a W^T (SORTED_SWAP off)
  offline_trees M ${AB_BASE:-} $PWD
fi
if has moeswap; then  # the default (SORTED_SWAP, the grouped GEMMs as W a^T) against it off, offline M in each tree
  variant_tree noswap layers/fused_moe.py -e "s/^SORTED_SWAP = .*/SORTED_SWAP = False/"
  offline_trees M /tmp/noswap $PWD
fi
if has moe-hf; then  # the same workload's ratio to transformers (one left-padded batch; fewer prompts)
  $GS bench offline $M --num-prompts 32 --compare-transformers padded --no-floor --no-show-progress \
    --output-json $OUT/offline_M_hf.json 2>&1 | tee $OUT/offline_M_hf.log | grep -vE "Warning|warn\(" | tail -6
fi
if has burst; then  # issue 24: 2,000 one-token requests at once on the 0.6B shape; BURST_BASE: an older tree to compare
  ROOT=$PWD
  for tree in ${BURST_BASE:-} $PWD; do
    tag=$(basename $tree)
    (cd $tree && PYTHONPATH=$tree:$ROOT/.site exec python3 $ROOT/scripts/bench_burst.py $Q \
      --output-json $OUT/burst_engine_$tag.json) 2>&1 | grep -E "^burst" | tee -a $OUT/burst.txt
    [ "${BURST_HTTP:-1}" = 0 ] && continue  # the Engine burst only
    (cd $tree && PYTHONPATH=$tree:$ROOT/.site exec $GS serve $Q --port 30012 --no-show-progress) > $OUT/burst_$tag.log 2>&1 &
    SERVER=$!
    for i in $(seq 240); do curl -sf localhost:30012/health > /dev/null && break; sleep 1; done
    echo "== burst over HTTP, server tree $tag"
    $GS bench serving --base-url http://127.0.0.1:30012 --dataset-name random --random-input-len 16 \
      --random-output-len 1 --random-range-ratio 1 --num-prompts 2000 --warmup-requests 1 --disable-tqdm \
      --output-file $OUT/burst.jsonl 2>&1 | grep -E "TTFT|prefill|order|throughput" | tee -a $OUT/burst.txt
    kill $SERVER; wait $SERVER
  done
fi
if has ab; then  # TPOT at this tree and at AB_BASE (another tree, copied in untracked), same lease; AB_ARGS: more
  # bench latency flags for both (e.g. --batch-size 4, which trees from 45f9bfa on know)
  ab_trees ${AB_BASE:?AB_BASE names the other tree} $PWD
fi
if has solo; then  # decode attention: contexts up to solo_len in one program a KV head (no merge), kernel and models
  gpu_tests solo_tests tests/test_triton_decode_attention.py
  for heads in $HEADS; do set -- ${heads/:/ }
    python3 scripts/bench_decode_kernel.py --heads $1 --kv-heads $2 --batches 1,4,64 --contexts 128,384,768,1536 \
      --splits 64 --block-n 64 --warps 4 --stages 3 --top 1 --solo 0,256,512,1024 2>&1 | grep -v Warning \
      | tee $OUT/decode_solo_$1_$2.txt | grep -E "^batch|defaults"
  done
  # the models with SOLO_LEN at SOLO_AB keys (bench latency's contexts are 257-384) in a copy of this tree
  variant_tree solo attention/triton_ops/decode_attention.py -e "s/^SOLO_LEN = .*/SOLO_LEN = ${SOLO_AB:-512}/"
  AB_MODELS=${SOLO_MODELS:-Q L M} ab_trees $PWD /tmp/solo
fi
if has tiles; then  # tiles as the model calls them (a plain product's sweep misses the split norm's partials, the
  # stores and the neighbours' L2 state): one copy of this tree per variant in TILES, comma-separated, named t1, t2, ...
  # "N K bytes:rows K-tile warps" sets ONE_ROW_TILES[(N, K, bytes)] (the one-row decode GEMM, one stage);
  # "gate_up:..." or "down:..." sets the MoE matrix-vector kernel's VEC_CONFIG entry. TILE_MODELS' batch-1 TPOT against
  # this tree. By default the 8B's bf16 GEMMs in K tiles of 2,048 (what gained on the 30B-A3B's qkv)
  IFS=, read -ra variants <<< "${TILES:-6144 4096 2:8 2048 8,4096 4096 2:8 2048 8,28672 4096 2:8 2048 8,28672 4096 2:4 2048 4,4096 14336 2:8 2048 8}"
  i=0; for v in "${variants[@]}"; do i=$((i + 1)); key=${v%%:*} tile=${v#*:}
    if [[ $key == [a-z]* ]]; then file=layers/fused_moe.py line="VEC_CONFIG[\"$key\"] = (${tile// /, }, 1)"
    else file=layers/decode_gemm.py line="ONE_ROW_TILES[(${key// /, })] = (${tile// /, }, 1)"; fi
    variant_tree t$i $file -e "\$a $line"
    echo "t$i: $(tail -1 /tmp/t$i/gridserve/$file)"
  done
  AB_MODELS=${TILE_MODELS:-L} ab_trees $PWD $(seq -f /tmp/t%g 1 $i)
fi
if has pipeline; then  # one row's K loops with loads ahead (Triton's pipelining, which the loops without tl.dot
  # never had): the kernels' GPU tests; the decode GEMM on every shape, bf16 and FP8, and the MoE layer's
  # matrix-vector kernels at 1-4 stages; then PIPE_MODELS' TPOT in a copy of this tree with PIPE_STAGES (default 3;
  # down PIPE_DOWN, default 2) in the one-row tiles and the MoE vector kernels
  gpu_tests pipeline_tests tests/test_decode_gemm.py tests/test_fused_moe.py
  python3 scripts/bench_fp8_gemm.py --stages 1,2,3,4 2>&1 | grep -v Warning | tee $OUT/pipeline_gemm.txt
  python3 scripts/bench_moe_kernel.py --stages 1,2,3,4 --batches 1,8 2>&1 | grep -v Warning \
    | tee $OUT/pipeline_moe.txt
  S=${PIPE_STAGES:-3}
  variant_tree pipe layers/decode_gemm.py -e "s/^ONE_ROW_CONFIG = (\(.*\), 1)$/ONE_ROW_CONFIG = (\1, $S)/" \
    -e "/^ONE_ROW_TILES/,/}$/ s/, 1)\([,}]\)/, $S)\1/g"
  sed -i -e "s/^VEC_CONFIG = {\"gate_up\": (\(.*\), 1), \"down\": (\(.*\), 1)}/VEC_CONFIG = {\"gate_up\": (\1, $S), \"down\": (\2, ${PIPE_DOWN:-2})}/" \
    /tmp/pipe/gridserve/layers/fused_moe.py
  grep -hE "^ONE_ROW_CONFIG|^VEC_CONFIG|: \(.*\)[,}]$" /tmp/pipe/gridserve/layers/{decode_gemm,fused_moe}.py | head -4
  AB_MODELS=${PIPE_MODELS:-M Q L} ab_trees $PWD /tmp/pipe
fi
if has pdl; then  # issue 20: programmatic dependent launch (on by default on Hopper; --disable-pdl): a kernel chain in a
  # graph, the greedy tokens against PDL off, batch-1 latency with and without it (PDL_MODELS: which shapes)
  gpu_tests pdl_tests tests/test_pdl.py
  python3 scripts/greedy_agreement.py $Q --baseline disable_pdl=true --num-prompts 24 \
    --output-json $OUT/agreement_pdl.json > $OUT/agreement_pdl.log 2>&1; tail -4 $OUT/agreement_pdl.log
  for m in ${PDL_MODELS:-Q L M}; do for flag in "" "--disable-pdl"; do
    $GS bench latency ${!m} $flag --input-len 256 --output-len 128 --num-runs 3 --no-show-progress \
      --output-json $OUT/latency_$m${flag:+_nopdl}.json 2>&1 | tee $OUT/latency_$m${flag:+_nopdl}.log \
      | grep -E "TPOT|rror" | sed "s/^/$m ${flag:-pdl}: /"
  done; done
  # does the host keep ahead of a shorter step? (cProfile: the time not in Event.synchronize is the host's)
  python3 scripts/profile_scheduler.py $Q --batch-size 1 --no-show-progress --top 12 2>&1 \
    | grep -v Warning > $OUT/profile_Q_pdl.txt; head -12 $OUT/profile_Q_pdl.txt
fi
if has pdlchain; then  # does a graph keep PDL's programmatic edges? launches of a tiny kernel, and the decode GEMM;
  # then batch-1 TPOT of PDL_MODELS with PDL off, with the early trigger (a copy) and the late one (the tree's)
  python3 scripts/bench_pdl_chain.py 2>&1 | grep -v Warning | tee $OUT/pdl_chain.txt
  gpu_tests pdl_tests tests/test_pdl.py
  variant_tree pdlearly pdl.py -e 's/^TRIGGER = LATE .*/TRIGGER = EARLY/'
  grep -n "^TRIGGER" /tmp/pdlearly/gridserve/pdl.py
  rm -rf /tmp/pdllate && mkdir -p /tmp/pdllate && cp -r gridserve /tmp/pdllate/
  AB_MODELS=${PDL_MODELS:-M L} AB_ARGS=--disable-pdl ab_trees $PWD
  AB_MODELS=${PDL_MODELS:-M L} ab_trees /tmp/pdlearly /tmp/pdllate
fi
if has rope; then  # the prefill's rotary kernels (q/k norm + rotary; rotary) on an 8,192-token chunk
  python3 scripts/bench_rope_kernel.py 2>&1 | grep -v Warning | tee $OUT/rope_kernel.txt
fi
if has fusedgemm; then  # issue 20: the decode GEMM with the norm or the SiLU-and-mul folded in, against both apart,
  # at 1, 2, 4 and 8 rows (the model folds at one row only: would it pay at serving's few rows?)
  python3 scripts/bench_fp8_gemm.py --fused --batches 1,2,4,8 2>&1 | grep -v Warning | tee $OUT/fused_gemm.txt
fi
if has gemmtiles; then  # the one-row decode GEMM's tiles shape by shape, against the default and cuBLAS (~150 s at
  # one stage count; TILE_STAGES: the grid's, e.g. "3 4"; TILE_SHAPES: which models' shapes)
  python3 scripts/bench_fp8_gemm.py --sweep-shapes --stages $(echo ${TILE_STAGES:-1} | tr ' ' ,) \
    --shapes ${TILE_SHAPES:-llama8b,qwen3-0.6b,qwen3-30b-a3b} 2>&1 | grep -v Warning | tee $OUT/gemm_tiles_per_shape.txt
fi
if has gemmtiles8; then  # the same with FP8 weights (issue 20's FP8 L target), K tiles up to 2,048 (~150 s)
  python3 scripts/bench_fp8_gemm.py --sweep-shapes --fp8 2>&1 | grep -v Warning | tee $OUT/gemm_tiles_fp8.txt
fi
if has fewrows; then  # 2-16 rows (at 4): the tl.dot path's tiles shape by shape against its default (~200 s)
  python3 scripts/bench_fp8_gemm.py --few-rows --shapes llama8b,qwen3-30b-a3b 2>&1 | grep -v Warning \
    | tee $OUT/gemm_few_rows.txt
fi
if has fewswap; then  # 2-16 rows with the product transposed (FEW_ROWS_SWAP): the tile grid, then L at batch 4 in a
  # copy of this tree with the swap on and SWAP_TILES for every shape
  python3 scripts/bench_fp8_gemm.py --few-rows --swap --shapes ${SWAP_SHAPES:-llama8b,qwen3-30b-a3b} 2>&1 | grep -v Warning \
    | tee $OUT/gemm_few_rows_swap.txt
  variant_tree swap layers/decode_gemm.py -e "s/^FEW_ROWS_SWAP = .*/FEW_ROWS_SWAP = True/" \
    -e "s/^DECODE_GEMM_CONFIG = .*/DECODE_GEMM_CONFIG = ${SWAP_TILES:-(64, 128, 4, 3)}/" \
    -e "s/^FEW_ROWS_TILES: .*/FEW_ROWS_TILES: dict = {}; _UNUSED = {/"
  AB_MODELS="L" AB_ARGS="--batch-size 4" ab_trees $PWD /tmp/swap
fi
if has prefillgemm; then  # issue 20 (TTFT): cuBLAS on a short prompt's linear layers against the floor (~20 s)
  python3 scripts/bench_prefill_gemm.py 2>&1 | grep -v Warning | tee $OUT/prefill_gemm.txt
fi
if has prefillgemm2; then  # the same at 128-512 rows against F.linear, swapped operands and Triton tiles (~120 s)
  python3 scripts/bench_prefill_gemm.py --check 2>&1 | tail -1
  python3 scripts/bench_prefill_gemm.py --rows 128,256,384,512 --variants 2>&1 | grep -v Warning \
    | tee $OUT/prefill_gemm_variants.txt
fi
if has gemm; then  # issues 19 and 20: decode-sized linear layers (cuBLAS, Triton bf16, Triton FP8), FP8 experts
  gpu_tests gemm_tests tests/test_quantization.py tests/test_decode_gemm.py -k "cuda or quant or w8a16 or decode_linear"
  python3 scripts/bench_fp8_gemm.py --sweep 2>&1 | grep -v Warning | tee $OUT/fp8_gemm.txt
  python3 scripts/bench_moe_kernel.py --fp8 --sweep --batches 1,8,64,256 2>&1 | grep -v Warning | tee $OUT/moe_kernel_fp8.txt
fi
if has longctx; then  # issue 20: the 8B shape with a 32,000-token prompt: the kernels, then TTFT and TPOT
  python3 scripts/bench_extend_kernel.py --sweep 2>&1 | grep -v Warning | tee $OUT/extend_kernel_long.txt
  python3 scripts/bench_decode_kernel.py --heads 32 --kv-heads 8 --batches 1 --contexts 2048,32768 \
    --splits 16,32,64 --block-n 64 --warps 4 --stages 2 2>&1 | grep -v Warning | tee $OUT/decode_kernel_long.txt
  $GS bench latency ${L/--context-length 4096/--context-length 32768} --input-len 32000 --output-len 64 \
    --num-runs 2 --no-show-progress --output-json $OUT/latency_L_32k.json 2>&1 | tee $OUT/latency_L_32k.log \
    | grep -E "TTFT|TPOT|floor|rror"
fi
if has prof32k; then  # issue 20: the 32k prompt's prefill by kernel (chunks, attention against the GEMMs)
  python3 scripts/profile_scheduler.py ${L/--context-length 4096/--context-length 32768} --input-len 32000 \
    --output-len 1 --kernels --top 25 --no-show-progress 2>&1 | grep -v Warning > $OUT/profile_32k.txt
  tail -34 $OUT/profile_32k.txt | cut -c1-200
fi
if has longprefill; then  # issue 20: long prompts' attention through cuDNN (the default on Hopper) against Triton
  gpu_tests longprefill_tests tests/test_long_extend.py
  python3 scripts/bench_extend_sdpa.py 2>&1 | grep -v Warning | tee $OUT/extend_sdpa.txt
  # without PyTorch's switch for cuDNN's ragged path (long_extend.py sets it): exact-shape plans
  TORCH_CUDNN_SDPA_AVOID_RECOMPILE=0 python3 scripts/bench_extend_sdpa.py 2>&1 | grep -v Warning \
    | tee $OUT/extend_sdpa_exact_plans.txt
  for flag in "" "--disable-cudnn-prefill"; do
    $GS bench latency ${L/--context-length 4096/--context-length 32768} $flag --input-len 32000 --output-len 64 \
      --num-runs 2 --no-show-progress --output-json $OUT/latency_L_32k${flag:+_triton}.json 2>&1 \
      | tee $OUT/latency_L_32k${flag:+_triton}.log | grep -E "TTFT|TPOT|floor|rror|Falling back"
  done
fi
if has long32k; then  # the 32k prompt's latency with the defaults alone (the cuDNN path's ragged plans)
  $GS bench latency ${L/--context-length 4096/--context-length 32768} --input-len 32000 --output-len 64 \
    --num-runs 2 --no-show-progress --output-json $OUT/latency_L_32k.json 2>&1 | tee $OUT/latency_L_32k.log \
    | grep -E "TTFT|TPOT|floor|rror|Falling back"
fi
if has fp8; then  # issue 20: FP8 weights on the 8B and 30B-A3B shapes: batch-1 latency against bf16, agreement
  for q in "--quantization fp8" ""; do for m in ${FP8_MODELS:-L M}; do
    $GS bench latency ${!m} $q --input-len 256 --output-len 128 --num-runs 3 --no-show-progress \
      --output-json $OUT/latency_$m${q:+_fp8}.json 2>&1 | tee $OUT/latency_$m${q:+_fp8}.log | grep -E "TTFT|TPOT|floor|rror"
  done; done
  python3 scripts/greedy_agreement.py $Q --candidate quantization=fp8 --num-prompts 32 --output-len 32 \
    --output-json $OUT/agreement_fp8.json > $OUT/agreement_fp8.log 2>&1; tail -4 $OUT/agreement_fp8.log
fi
if has sharedprefix; then  # issue 20: SGLang's shared-prefix dataset on the 8B shape, radix cache on and off
  for flag in "" "--disable-radix-cache"; do
    $GS serve $L $flag --port 30013 --no-show-progress > $OUT/serve_gsp${flag:+_noradix}.log 2>&1 &
    SERVER=$!
    for i in $(seq 240); do curl -sf localhost:30013/health > /dev/null && break; sleep 1; done
    echo "== generated-shared-prefix ${flag:-with the radix cache}"
    $GS bench serving --base-url http://127.0.0.1:30013 --dataset-name generated-shared-prefix --gsp-num-groups 16 \
      --gsp-prompts-per-group 16 --max-concurrency 64 --disable-tqdm --output-file $OUT/gsp.jsonl 2>&1 \
      | grep -E "throughput|TTFT|hit"
    kill $SERVER; wait $SERVER
  done
fi
