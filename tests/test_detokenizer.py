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


@pytest.mark.parametrize("which", ["embedded", "qwen3"])
def test_decode_only_tokenizer_equals_transformers(which, tok):
    # The scheduler and detokenizer processes decode with `tokenizers` alone (no transformers import): same
    # text as transformers' tokenizer, special tokens skipped or kept alike, same eos.
    import random

    from gridserve.tokenizer import FastTokenizer, decode_batch, get_decoder, get_transformers_tokenizer

    if which == "embedded":  # the front end's load (fixture) cached the converted GGUF tokenizer
        decoder, hf = get_decoder(default_model_path()), get_transformers_tokenizer(default_model_path())
    else:
        from tests.tiny_models import qwen_tokenizer_dir

        path = qwen_tokenizer_dir()
        decoder, hf = get_decoder(path, path), get_transformers_tokenizer(path, path)
    assert isinstance(decoder, FastTokenizer) and decoder.decode_only
    assert decoder.eos_token_id == hf.eos_token_id
    rng = random.Random(0)
    specials = list(hf.all_special_ids)
    seqs = [[rng.randrange(len(hf)) for _ in range(rng.randint(1, 12))] + rng.sample(specials, 1) for _ in range(50)]
    seqs.append(hf.encode("naïve café — 東京 🚀 <|im_start|>user\nhi<|im_end|>"))
    for skip in (True, False):
        want = [hf.decode(s, skip_special_tokens=skip) for s in seqs]
        assert [decoder.decode(s, skip_special_tokens=skip) for s in seqs] == want
        assert decode_batch(decoder, seqs, skip) == want
