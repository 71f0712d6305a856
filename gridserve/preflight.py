"""Cheap checks before any process of a deployment starts: the port is free, the model and its tokenizer load,
the split fits the model, the GPUs exist. Each failure is one line saying what is wrong and what to do, and
costs the user a second instead of a model load (minutes, for a big model)."""

import socket
from typing import TYPE_CHECKING

from gridserve.server_args import ServerArgs

if TYPE_CHECKING:  # the model stack (torch) loads in check_model, after the children are spawned
    from gridserve.models.config import ModelConfig


class StartupError(ValueError):
    """A start-up precondition that does not hold; its message is the whole story (no traceback)."""


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """Raises StartupError when host:port cannot be bound (taken, or an address this machine does not have)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no obstacle
            s.bind((host, port))
    except OSError as e:
        raise StartupError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror or e}); stop what uses it "
                           f"or choose another {flag}") from None


def resolve_model(args: ServerArgs) -> str:
    """The model's path (a folder or a GGUF file), once it is known to exist; cheap (no torch)."""
    from gridserve.model_loader.paths import resolve_model_path

    try:
        return resolve_model_path(args.model_path)
    except FileNotFoundError as e:
        raise StartupError(f"--model-path: {e}") from None


def check_model(args: ServerArgs, path: str | None = None) -> "tuple[str, ModelConfig]":
    """The model's resolved path and config, once it is known to exist, to be supported and to split as asked."""
    from gridserve.layers.quantization import checkpoint_quantization
    from gridserve.model_loader.loader import load_model_config

    path = path or resolve_model(args)
    try:
        cfg = load_model_config(path)
    except (OSError, KeyError, TypeError) as e:
        raise StartupError(f"--model-path {path}: its config cannot be read ({type(e).__name__}: {e})") from None
    except ValueError as e:  # an unsupported architecture names the supported ones
        raise StartupError(f"--model-path {path}: {e}") from None
    try:
        cfg.check_parallel(args.tp_size, args.pp_size, args.pp_partition, args.ep_size)
        checkpoint_quantization(cfg.hf_config)
    except ValueError as e:
        raise StartupError(str(e)) from None
    return path, cfg


def check_device(args: ServerArgs, ranks_per_node: int) -> None:
    """--device cuda needs a torch that sees CUDA, and as many GPUs as this node's ranks use."""
    if args.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise StartupError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; install a CUDA build "
                           "of torch (docs/user-guide.md, Installing) or use --device cpu")
    last = args.base_gpu_id + (ranks_per_node - 1) * args.gpu_id_step
    if last >= torch.cuda.device_count():
        raise StartupError(f"this node's {ranks_per_node} rank(s) need GPU ids {args.base_gpu_id}..{last} "
                           f"(--base-gpu-id, --gpu-id-step), but this machine has {torch.cuda.device_count()} GPU(s)")


def load_tokenizer(model_path: str, tokenizer_path: str | None):
    """The front end's tokenizer; a folder without a usable one is a StartupError."""
    from gridserve.tokenizer import get_tokenizer

    try:
        return get_tokenizer(model_path, tokenizer_path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs the one line
        where = f"--tokenizer-path {tokenizer_path}" if tokenizer_path else f"--model-path {model_path}"
        raise StartupError(f"{where}: the tokenizer does not load ({type(e).__name__}: {str(e)[:200]})") from None
