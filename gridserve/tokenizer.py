"""Loads the tokenizer of a model folder or GGUF file."""

import os

from transformers import AutoTokenizer

from gridserve.model_loader.loader import is_gguf


def get_tokenizer(model_path: str, tokenizer_path: str | None = None):
    if tokenizer_path is not None:
        return AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer_path))
    if is_gguf(model_path):
        from gridserve.model_loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(model_path)
    return AutoTokenizer.from_pretrained(model_path)
