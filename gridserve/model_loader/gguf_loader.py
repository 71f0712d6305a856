"""Load GGUF checkpoints (llama.cpp's single-file format) as Hugging Face-style config + float32 tensors.

The engine's models are written against Hugging Face names and layouts, so this module translates:
GGUF metadata -> a config.json-style dict, GGUF tensor names -> HF parameter names, and quantized blocks ->
float32 tensors (via gguf's own dequantization). Tensors are produced one at a time so peak memory stays
at roughly one dequantized tensor on top of the memory-mapped file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gridserve.model_loader.gguf_file import GGUFFile
from gridserve.model_loader.paths import tokenizer_cache_dir

logger = logging.getLogger(__name__)


# GGUF general.architecture -> HF model_type / architectures class name.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Whole-model tensors; per-block ones are in _BLOCK_NAMES.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

# GGUF rope.scaling.* suffix -> HF rope_scaling key.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}

_REQUIRED = object()


def gguf_to_hf_name(name: str) -> str:
    """Map a GGUF tensor name ("blk.3.attn_q.weight") to its Hugging Face name."""
    if m := _BLOCK_RE.fullmatch(name):
        layer, kind, suffix = m.groups()
        if kind in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
    elif (m := _GLOBAL_RE.fullmatch(name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    hint = ""
    if name.startswith("rope_freqs"):
        hint = " (llama3-style rope frequency factors are not supported)"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent in gridserve{hint}")


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    HF's rotary embedding pairs dimension i with i + head_dim/2 (rotate_half); llama.cpp pairs adjacent
    dimensions (2i, 2i+1), so its converter reorders each head's rows from [first half | second half] to
    interleaved. Here we reverse that: rows (head, i, pair) -> (head, pair, i).
    """
    shape = w.shape
    half = shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *shape[1:]).transpose(1, 2).reshape(shape).contiguous()


class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint: `config` dict + `tensors()` in HF names/layouts."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        # The file is memory-mapped; tensor data is only touched when dequantized.
        self.file = GGUFFile(self.path)
        self.arch = self._field("general.architecture")
        if self.arch not in _ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(_ARCHITECTURES)})"
            )
        # Map every name up front so an unsupported tensor fails at open time, not mid-load.
        self._names = [gguf_to_hf_name(t.name) for t in self.file.tensors]
        self.config = self._build_config()

    def _field(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.file.fields.get(key)
        if value is None:
            if default is _REQUIRED:
                raise KeyError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return value

    def _arch_field(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._field(f"{self.arch}.{key}", default)

    def _vocab_size(self) -> int:
        if (n := self._arch_field("vocab_size", None)) is not None:
            return int(n)
        # Most converters don't write vocab_size; the token list length is authoritative.
        if (tokens := self.file.fields.get("tokenizer.ggml.tokens")) is not None:
            return len(tokens)
        for t in self.file.tensors:
            if t.name == "token_embd.weight":
                return int(t.dims[-1])  # GGUF dims are (in, out): ne[1] is the vocab
        raise KeyError(f"{self.path}: cannot determine vocab_size")

    def _rope_scaling(self) -> dict[str, Any] | None:
        rope_type = self._arch_field("rope.scaling.type", None)
        if rope_type is None and (linear := self._arch_field("rope.scale_linear", None)) is not None:
            rope_type, extra = "linear", {"factor": float(linear)}  # older files: a single linear factor
        else:
            extra = {}
        if rope_type in (None, "none"):
            return None
        scaling: dict[str, Any] = {"rope_type": rope_type, **extra}
        for gguf_key, hf_key in _ROPE_SCALING_KEYS.items():
            value = self._arch_field(f"rope.scaling.{gguf_key}", None)
            if value is not None:
                scaling[hf_key] = int(value) if hf_key.startswith("original_") else float(value)
        return scaling

    def _build_config(self) -> dict[str, Any]:
        hidden = int(self._arch_field("embedding_length"))
        heads = int(self._arch_field("attention.head_count"))
        kv_heads = int(self._arch_field("attention.head_count_kv", heads))
        # key_length is written when head_dim != hidden/heads (e.g. Qwen3); llama/qwen rotate the full head,
        # so rope.dimension_count is the head size too.
        head_dim = self._arch_field("attention.key_length", None)
        head_dim = head_dim or self._arch_field("rope.dimension_count", None) or hidden // heads
        tensor_names = {t.name for t in self.file.tensors}
        config: dict[str, Any] = {
            "model_type": self.arch,
            "architectures": [_ARCHITECTURES[self.arch]],
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": int(head_dim),
            "hidden_act": "silu",
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": int(self._arch_field("context_length", 2048)),
            "vocab_size": self._vocab_size(),
            # llama.cpp drops output.weight when it is the embedding matrix.
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id", None),
            # Qwen2 always has q/k/v biases; for the others the tensors tell.
            "attention_bias": self.arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
            "torch_dtype": "float32",
        }
        return config

    def tensor_names(self) -> list[str]:
        """Hugging Face names of the tensors, in file order."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor in HF layout), dequantizing one tensor at a time."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        n_head = self.config["num_attention_heads"]
        n_kv_head = self.config["num_key_value_heads"]
        for t, name in zip(self.file.tensors, self._names, strict=True):
            # numpy shape is already HF's (out_features, in_features): GGUF stores dims reversed.
            w = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
            # F32 data is a read-only view of the mmap; copy (only then) so torch owns writable memory.
            w = torch.from_numpy(np.require(w, dtype=np.float32, requirements=["C", "W"]))
            if self.arch == "llama":
                # Only llama's converter permutes q/k (weights and biases); qwen2/qwen3 are stored as in HF.
                if ".q_proj." in name:
                    w = _unpermute_rotary(w, n_head)
                elif ".k_proj." in name:
                    w = _unpermute_rotary(w, n_kv_head)
            yield name, w


# ----------------------------------------------------------------------------------------------- tokenizer

_TOKENIZER_PROBE = "Hello, world! <|im_start|>user\nÇa va? 12345  tabs\tand  spaces<|im_end|></s><s>"
_PROBE_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
]


def _tokenizer_fingerprint(tok: Any) -> tuple:
    """What must survive a save/load round trip: ids (plain, special tokens, chat template) and specials."""
    chat = None
    if tok.chat_template:
        chat = tok.apply_chat_template(_PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
    return (
        tok.encode(_TOKENIZER_PROBE),
        tok.encode(chat) if chat is not None else None,
        tok.chat_template,
        tok.eos_token_id,
        tok.bos_token,
        len(tok),
    )


def _convert_gguf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def load_gguf_tokenizer(path: str) -> Any:
    """The file's tokenizer as a transformers tokenizer (chat template, bos/eos from the GGUF metadata).

    transformers rebuilds the tokenizer from the GGUF vocab/merges, which takes seconds; the result is saved
    once with save_pretrained and reloaded from the cache afterwards. Caching is best-effort: an unwritable
    cache dir, or a round trip that changes any token id, just means no cache.
    """
    from transformers import AutoTokenizer

    path = os.path.abspath(path)
    cache_dir = tokenizer_cache_dir(path)
    # The processes of a deployment start at once; the first converts, the others wait and read its cache.
    with _exclusive(f"{cache_dir}.lock"):
        if os.path.isdir(cache_dir):
            try:
                tok = AutoTokenizer.from_pretrained(cache_dir)
                if tok.eos_token_id is not None:
                    return tok
                logger.warning("cached tokenizer %s has no eos token; rebuilding", cache_dir)
            except Exception as e:  # a corrupt cache must never block serving
                logger.warning("cached tokenizer %s unreadable (%s); rebuilding", cache_dir, e)
            shutil.rmtree(cache_dir, ignore_errors=True)
        return _convert_and_cache(path, cache_dir)


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Holds an exclusive lock on lock_path (best-effort: where it cannot be created, no lock)."""
    try:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _convert_and_cache(path: str, cache_dir: str) -> Any:
    t0 = time.perf_counter()
    tok = _convert_gguf_tokenizer(path)
    logger.info("converted GGUF tokenizer in %.1fs", time.perf_counter() - t0)
    try:
        _save_tokenizer_cache(tok, cache_dir)
    except OSError as e:
        logger.info("not caching the tokenizer (%s)", e)
    return tok


def _save_tokenizer_cache(tok: Any, cache_dir: str) -> None:
    from transformers import AutoTokenizer

    parent = os.path.dirname(cache_dir)
    os.makedirs(parent, exist_ok=True)
    # Write to a temp dir and rename, so a concurrent reader never sees a half-written tokenizer.
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        tok.save_pretrained(tmp)
        if _tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp)) != _tokenizer_fingerprint(tok):
            logger.warning("tokenizer changes after save_pretrained; not caching it")
            return
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            if not os.path.isdir(cache_dir):  # else: another process won the race, fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
