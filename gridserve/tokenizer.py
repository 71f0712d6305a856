"""Loads the tokenizer of a model folder or GGUF file.

Where the folder allows (`FastTokenizer.load`), every process uses a `FastTokenizer`: the `tokenizers` library and
jinja2 alone, with the same ids, text and chat prompts as transformers' fast tokenizer. Importing transformers took
~10 s of the front end's start on the GPU image (and 11 s of each child's, before the children stopped using it).
Other folders, and the first load of a GGUF file's tokenizer (transformers converts and caches it), get
transformers' tokenizer.
"""

import json
import os

# Tokenizer classes whose transformers loader leaves tokenizer.json's pipeline as it is, so the `tokenizers` library
# alone encodes the same ids. Others (Llama's, T5's, ...) may rewrite the post-processor or pre-tokenizer from the
# config's add_bos_token / add_prefix_space / legacy flags at load time.
_ENCODE_AS_IS = {"PreTrainedTokenizerFast", "TokenizersBackend", "Qwen2Tokenizer", "Qwen2TokenizerFast",
                 "GPT2Tokenizer", "GPT2TokenizerFast"}
_LOAD_TIME_REWRITES = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class FastTokenizer:
    """The part of a transformers fast tokenizer the engine and its users call: encode, decode, the chat template,
    the vocabulary and the special tokens. `decode_only` instances (any tokenizer.json whose decode transformers
    does not post-process) serve the scheduler and the detokenizer."""

    is_fast = True
    clean_up_tokenization_spaces = False

    def __init__(self, backend, config: dict, chat_template: str | None = None, decode_only: bool = False):
        self.backend_tokenizer = backend
        self.decode_only = decode_only
        # a string, or named templates (picked when a conversation is rendered, as transformers does)
        self.chat_template = chat_template or config.get("chat_template")
        self.special_tokens_map = {k: v for k in SPECIAL_TOKENS if (v := _content(config.get(k))) is not None}
        for name in SPECIAL_TOKENS:  # bos_token, bos_token_id, ...: None where the config names none
            token = self.special_tokens_map.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", None if token is None else backend.token_to_id(token))
        extra = [_content(t) for t in config.get("additional_special_tokens") or []]
        ids = (backend.token_to_id(t) for t in [*self.special_tokens_map.values(), *extra])
        self.all_special_ids = sorted({i for i in ids if i is not None})

    @classmethod
    def load(cls, folder: str | None, decode_only: bool = False) -> "FastTokenizer | None":
        """The folder's tokenizer, or None where only transformers loads it faithfully."""
        files = [os.path.join(folder, n) for n in ("tokenizer.json", "tokenizer_config.json")] if folder else []
        if not files or not all(os.path.isfile(f) for f in files):
            return None
        with open(files[1]) as f:
            config = json.load(f)
        if config.get("clean_up_tokenization_spaces", False):
            return None
        if not decode_only and (config.get("tokenizer_class") not in _ENCODE_AS_IS
                                or any(config.get(k) for k in _LOAD_TIME_REWRITES)):
            return None
        template_file = os.path.join(folder, "chat_template.jinja")  # where newer transformers save it
        template = None
        if not decode_only and os.path.isfile(template_file):  # decoding never renders a conversation
            with open(template_file) as f:
                template = f.read()
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(files[0]), config, template, decode_only)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.decode_only:
            raise RuntimeError("this tokenizer was loaded to decode only")
        # encode_batch releases the GIL while it works; encode holds it (tokenizers 0.23), and a megabyte prompt
        # tokenized on the front end's worker thread then stalled its event loop, /health included, for seconds.
        return self.backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend_tokenizer.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs) -> str | list[int]:
        from gridserve.chat_template import pick_template, render_chat

        template = pick_template(self.chat_template, kwargs.get("tools"))
        if template is None:
            raise ValueError("this tokenizer has no chat template")
        text = render_chat(template, messages, add_generation_prompt, self.special_tokens_map, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def decode_batch(tokenizer, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
    """`tokenizer.batch_decode(seqs)`, in one call to the Rust backend when that gives the same text (a fast
    tokenizer that does not clean up spaces): about 4x cheaper than transformers' per-sequence Python path,
    which made the detokenizer slower than the GPU at batch 256."""
    if getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.backend_tokenizer.decode_batch(seqs, skip_special_tokens=skip_special_tokens)
    return tokenizer.batch_decode(seqs, skip_special_tokens=skip_special_tokens)


def _tokenizer_folder(model_path: str, tokenizer_path: str | None) -> str | None:
    from gridserve.model_loader.paths import is_gguf, tokenizer_cache_dir

    if tokenizer_path is not None:
        return os.path.expanduser(tokenizer_path)
    if is_gguf(model_path):  # the converted tokenizer, once the front end has cached it
        return tokenizer_cache_dir(model_path)
    return model_path


def get_tokenizer(model_path: str, tokenizer_path: str | None = None):
    """The front end's tokenizer: a FastTokenizer where the folder allows, else transformers'."""
    fast = FastTokenizer.load(_tokenizer_folder(model_path, tokenizer_path))
    return fast if fast is not None else get_transformers_tokenizer(model_path, tokenizer_path)


def get_decoder(model_path: str, tokenizer_path: str | None = None):
    """The scheduler's and the detokenizer's tokenizer: they only decode (stop strings, output text)."""
    fast = FastTokenizer.load(_tokenizer_folder(model_path, tokenizer_path), decode_only=True)
    return fast if fast is not None else get_transformers_tokenizer(model_path, tokenizer_path)


def get_transformers_tokenizer(model_path: str, tokenizer_path: str | None = None):
    from transformers import AutoTokenizer

    from gridserve.model_loader.paths import is_gguf

    if tokenizer_path is not None:
        return AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer_path))
    if is_gguf(model_path):
        from gridserve.model_loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(model_path)
    return AutoTokenizer.from_pretrained(model_path)
