"""Loads the tokenizer of a model folder or GGUF file: the full transformers tokenizer for the front end, and a
decode-only one for the scheduler and detokenizer processes."""

import json
import os


def get_tokenizer(model_path: str, tokenizer_path: str | None = None):
    from transformers import AutoTokenizer

    from gridserve.model_loader.paths import is_gguf

    if tokenizer_path is not None:
        return AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer_path))
    if is_gguf(model_path):
        from gridserve.model_loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(model_path)
    return AutoTokenizer.from_pretrained(model_path)


def decode_batch(tokenizer, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
    """`tokenizer.batch_decode(seqs)`, in one call to the Rust backend when that gives the same text (a fast
    tokenizer that does not clean up spaces): about 4x cheaper than transformers' per-sequence Python path,
    which made the detokenizer slower than the GPU at batch 256."""
    if getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.backend_tokenizer.decode_batch(seqs, skip_special_tokens=skip_special_tokens)
    return tokenizer.batch_decode(seqs, skip_special_tokens=skip_special_tokens)


class RustDecoder:
    """Decode-only tokenizer on the `tokenizers` library alone, with the attributes the scheduler (stop strings,
    eos) and the detokenizer (`decode_batch`) use. Importing transformers took 11 s of each child process's
    start on the GPU image; `tokenizers` takes milliseconds and decodes the same tokenizer.json."""

    is_fast = True
    clean_up_tokenization_spaces = False

    def __init__(self, backend, eos_token_id: int | None):
        self.backend_tokenizer = backend
        self.eos_token_id = eos_token_id

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _tokenizer_folder(model_path: str, tokenizer_path: str | None) -> str | None:
    from gridserve.model_loader.paths import is_gguf, tokenizer_cache_dir

    if tokenizer_path is not None:
        return os.path.expanduser(tokenizer_path)
    if is_gguf(model_path):  # the converted tokenizer, once the front end has cached it
        return tokenizer_cache_dir(model_path)
    return model_path


def get_decoder(model_path: str, tokenizer_path: str | None = None):
    """A RustDecoder when the folder has tokenizer.json and its config asks for no space clean-up (so the text
    equals transformers' decode); otherwise the full tokenizer."""
    folder = _tokenizer_folder(model_path, tokenizer_path)
    files = [os.path.join(folder, n) for n in ("tokenizer.json", "tokenizer_config.json")] if folder else []
    if files and all(os.path.isfile(f) for f in files):
        with open(files[1]) as f:
            config = json.load(f)
        if not config.get("clean_up_tokenization_spaces", False):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(files[0])
            eos = config.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            return RustDecoder(backend, backend.token_to_id(eos) if eos else None)
    return get_tokenizer(model_path, tokenizer_path)
