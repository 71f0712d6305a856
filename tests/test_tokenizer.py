"""The FastTokenizer (tokenizers + jinja2, no transformers import) against transformers' own tokenizer, on the
embedded SmolLM2 tokenizer (converted from the GGUF file), on Qwen3's and on a Llama-3-style one whose
post-processor adds BOS: the same ids, tokens, vocabulary, special tokens and chat prompts. And the folders it
must leave to transformers."""

import json
import shutil

import jinja2
import pytest

from gridserve.model_loader.paths import default_model_path
from gridserve.tokenizer import FastTokenizer, get_decoder, get_tokenizer, get_transformers_tokenizer
from tests.tiny_models import qwen_tokenizer_dir

TEXTS = ["Hello world", " leading space", "two  spaces\tand a tab\n\nnew lines", "naïve café — 東京 🚀",
         "<|im_start|>user\nhi<|im_end|>", "<|endoftext|> in the middle", "x" * 300, "", "1234567 + 89 = ?"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
    [{"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because.", "reasoning_content": "Think first."},
     {"role": "user", "content": "And?"}],
]


def _bos_tokenizer(folder) -> str:
    """A Llama-3-style folder: `PreTrainedTokenizerFast` whose tokenizer.json post-processor adds a BOS token,
    byte-level BPE trained here on a few words, and a chat template that uses bos_token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog <|im_start|>"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}{{ bos_token }}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": template}))
    return str(folder)


@pytest.fixture(scope="module", params=["embedded", "qwen3", "bos"])
def pair(request, tmp_path_factory):
    if request.param == "embedded":
        hf = get_transformers_tokenizer(default_model_path())  # converts the GGUF tokenizer once and caches it
        ours = get_tokenizer(default_model_path())
    else:
        path = qwen_tokenizer_dir() if request.param == "qwen3" else _bos_tokenizer(tmp_path_factory.mktemp("t") / "b")
        hf, ours = get_transformers_tokenizer(path, path), get_tokenizer(path, path)
    assert isinstance(ours, FastTokenizer) and not ours.decode_only
    return ours, hf


def test_same_ids_tokens_and_vocabulary(pair):
    ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
    ids = hf.encode(TEXTS[3] + TEXTS[4])
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])
    assert ours.get_vocab() == hf.get_vocab() and len(ours) == len(hf)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert (getattr(ours, name), getattr(ours, f"{name}_id")) == (getattr(hf, name), getattr(hf, f"{name}_id"))
    assert set(ours.all_special_ids) == set(hf.all_special_ids)
    assert ours.decode(ids) == hf.decode(ids) and ours.batch_decode([ids, ids[:3]]) == hf.batch_decode([ids, ids[:3]])


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_same_chat_prompts(pair, generation_prompt):
    ours, hf = pair
    for chat in CHATS:
        want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt) == want
        assert ours.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt) == \
            hf.encode(want, add_special_tokens=False)
    if "enable_thinking" in (ours.chat_template or ""):  # Qwen3: template arguments pass through
        kw = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert ours.apply_chat_template(CHATS[0], **kw) == hf.apply_chat_template(CHATS[0], **kw)


def _variant(tmp_path, **config_changes):
    folder = tmp_path / "tok"
    shutil.copytree(qwen_tokenizer_dir(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **config_changes}))
    return str(folder)


@pytest.mark.parametrize("change", [{"clean_up_tokenization_spaces": True}, {"tokenizer_class": "LlamaTokenizerFast"},
                                    {"add_bos_token": True}, {"add_prefix_space": True}])
def test_folders_whose_loading_transformers_rewrites_get_transformers(tmp_path, change):
    folder = _variant(tmp_path, **change)
    assert not isinstance(get_tokenizer(folder, folder), FastTokenizer)
    decoder = get_decoder(folder, folder)  # decoding is the same unless spaces are cleaned up
    assert isinstance(decoder, FastTokenizer) != ("clean_up_tokenization_spaces" in change)


def test_template_helpers_and_errors_as_transformers_has_them(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                "{{ m | tojson }}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
                "{{ strftime_now('%Y') | length }}")
    folder = _variant(tmp_path, chat_template=template)
    ours, hf = get_tokenizer(folder, folder), get_transformers_tokenizer(folder, folder)
    chat = [{"role": "user", "content": "é <b>"}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False) == \
        '{"role": "user", "content": "é <b>"}<é <b>>4'  # tojson without HTML escapes or ASCII-only output
    for tok in (ours, hf):
        with pytest.raises(jinja2.TemplateError, match="no system role"):
            tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    with pytest.raises(TypeError, match="must be dicts"):
        ours.apply_chat_template(["hi"])


def test_named_chat_templates_pick_the_default(tmp_path):
    folder = _variant(tmp_path, chat_template=[{"name": "tool_use", "template": "T"},
                                               {"name": "default", "template": "D{{ messages[0].content }}"}])
    ours = get_tokenizer(folder, folder)
    hf = get_transformers_tokenizer(folder, folder)
    for tools, want in ((None, "D!"), ([{"name": "f"}], "T")):
        kw = dict(tools=tools, tokenize=False)
        assert ours.apply_chat_template([{"role": "user", "content": "!"}], **kw) == want
        assert hf.apply_chat_template([{"role": "user", "content": "!"}], **kw) == want
    folder = _variant(tmp_path / "b", chat_template=[{"name": "tool_use", "template": "T"}])
    ours = get_tokenizer(folder, folder)  # loads (as transformers' does); only rendering needs a default
    assert ours.encode("hi") == get_transformers_tokenizer(folder, folder).encode("hi")
    with pytest.raises(ValueError, match="none named default"):
        ours.apply_chat_template([{"role": "user", "content": "!"}])
