"""ServerArgs: every user-set option in one dataclass, validated in one place. The CLI is generated from it,
with SGLang's flag names (and a few short aliases users know from vLLM)."""

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

from gridserve.attention.registry import ATTENTION_BACKENDS

_LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
_CHOICES = {
    "dtype": ["auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32"],
    "device": ["auto", "cpu", "cuda"],
    "attention_backend": ["auto", *ATTENTION_BACKENDS],
    "load_format": ["auto", "dummy"],
    "quantization": ["fp8"],
    "moe_routing": ["model", "uniform"],
    "schedule_policy": ["fcfs", "lpm"],
    "log_level": _LOG_LEVELS,
    "log_level_http": _LOG_LEVELS,
    "load_balance_method": ["cache_aware", "round_robin", "total_requests", "shortest_queue", "total_tokens",
                            "minimum_tokens"],
}
# SGLang's older names of two load-balance methods
_LOAD_BALANCE_ALIASES = {"shortest_queue": "total_requests", "minimum_tokens": "total_tokens"}
_ALIASES = {"model_path": ["--model"], "tp_size": ["--tp"], "pp_size": ["--pp"], "dp_size": ["--dp"],
            "ep_size": ["--ep"]}
# --help's sections, in order; every field is in exactly one (tests check). `gridserve generate` runs no server,
# so it leaves out "server".
GROUPS = {
    "model": ["model_path", "tokenizer_path", "dtype", "device", "load_format", "moe_routing", "quantization",
              "context_length", "random_seed", "served_model_name"],
    "memory": ["max_total_tokens", "mem_fraction_static"],
    "scheduling": ["max_running_requests", "max_queued_requests", "max_prefill_tokens", "chunked_prefill_size",
                   "schedule_policy", "schedule_conservativeness", "disable_radix_cache", "watchdog_timeout",
                   "enable_priority_scheduling", "schedule_low_priority_values_first",
                   "priority_scheduling_preemption_threshold", "abort_on_priority_when_disabled"],
    "GPU speed": ["attention_backend", "disable_cudnn_prefill", "cuda_graph_max_bs", "disable_cuda_graph",
                  "piecewise_cuda_graph_max_tokens", "disable_piecewise_cuda_graph", "disable_overlap_schedule",
                  "enable_overlap_schedule", "disable_late_launch", "disable_pdl"],
    "parallelism": ["tp_size", "ep_size", "pp_size", "pp_max_micro_batch_size", "pp_layer_partition", "dp_size",
                    "load_balance_method", "base_gpu_id", "gpu_id_step"],
    "several nodes": ["nnodes", "node_rank", "dist_init_addr", "dist_timeout", "dist_ifname"],
    "server": ["host", "port", "api_key", "max_request_bytes", "grpc_mode"],
    "CPU": ["cpu_threads"],
    "logging": ["log_level", "log_level_http", "show_progress"],
}


def _scalar_type(t) -> type:
    """int for `int` and `int | None`, and so on."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServerArgs:
    model_path: str | None = _opt(None, "HF model folder or .gguf file; default: the embedded SmolLM2-135M")
    tokenizer_path: str | None = _opt(None, "tokenizer folder (default: the model's)")
    dtype: str = _opt("auto", "weights and activations dtype; auto = the checkpoint's")
    device: str = _opt("auto", "cuda when available, else cpu")
    load_format: str = _opt("auto", "'dummy' = random weights in the model's shapes (benchmarks)")
    moe_routing: str = _opt("model", "mixture-of-experts routing: model (the router's top k), or uniform: each "
                                     "token's k experts spread evenly over all of them, for benchmarks on random "
                                     "weights, whose routers send most tokens to a few experts (the outputs are then "
                                     "not the model's; a dense model is unchanged)")
    quantization: str | None = _opt(None, "fp8: linear layers in FP8 (per-channel weight scales, per-token "
                                          "activation scales); default: the checkpoint's (an FP8 checkpoint is fp8)")
    context_length: int | None = _opt(None, "max tokens per request (default: the model's)")
    max_total_tokens: int | None = _opt(None, "KV cache size in tokens (default: from memory)")
    mem_fraction_static: float = _opt(0.85, "GPU memory fraction for weights + KV cache")
    max_running_requests: int | None = _opt(None, "max requests decoding at once")
    max_queued_requests: int | None = _opt(None, "most requests waiting in a replica's queue; a request beyond it gets "
                                                 "503 at once (default: no limit)")
    max_prefill_tokens: int = _opt(16384, "max new tokens in one prefill batch")
    chunked_prefill_size: int = _opt(8192, "prefill long prompts in chunks of this many tokens; -1 = off")
    schedule_policy: str = _opt("fcfs", "waiting-queue order: fcfs, or lpm (longest cached prefix first)")
    enable_priority_scheduling: bool = _opt(False, "order the waiting queue by each request's `priority` (larger "
                                                   "first), then arrival; a much higher one preempts a running one")
    schedule_low_priority_values_first: bool = _opt(False, "with priority scheduling, smaller values go first")
    priority_scheduling_preemption_threshold: int = _opt(10, "a waiting request preempts a running one whose "
                                                             "priority it beats by more than this")
    abort_on_priority_when_disabled: bool = _opt(False, "refuse (400) a request that sets `priority` while priority "
                                                        "scheduling is off (by default it is ignored)")
    schedule_conservativeness: float = _opt(1.0, "room kept for running requests' future tokens; larger means "
                                                 "fewer retractions, smaller means more requests admitted")
    disable_radix_cache: bool = _opt(False, "turn off prefix sharing")
    attention_backend: str = _opt("auto", "attention kernels: triton (paged decode + extend; the default on CUDA) "
                                          "or torch (reference; the default on CPU)")
    disable_cudnn_prefill: bool = _opt(False, "run long prompts' attention (a request's 2,048+ new tokens) with the "
                                              "Triton kernel instead of cuDNN's fused attention, the default on "
                                              "Hopper and newer GPUs")
    cuda_graph_max_bs: int = _opt(256, "largest decode batch run as a captured CUDA graph; larger ones run eagerly")
    disable_cuda_graph: bool = _opt(False, "run decode and prefill eagerly (no CUDA graphs)")
    piecewise_cuda_graph_max_tokens: int = _opt(2048, "largest prefill (new tokens in the batch) replayed from "
                                                      "piecewise CUDA graphs; larger ones run eagerly")
    disable_piecewise_cuda_graph: bool = _opt(False, "run prefill eagerly while decode still uses CUDA graphs")
    disable_overlap_schedule: bool = _opt(False, "wait for each step before scheduling the next (the overlap "
                                                 "loop is the default on CUDA)")
    enable_overlap_schedule: bool = _opt(False, "use the overlap loop on CPU too, where it is off by default")
    disable_late_launch: bool = _opt(False, "overlap loop: launch each decode step as soon as the one before it is "
                                            "queued, instead of just before that one should end (late launch waits "
                                            "for new requests until then, so that one arriving meanwhile prefills "
                                            "after that step rather than after the next too: TTFT while others "
                                            "decode)")
    disable_pdl: bool = _opt(False, "launch the Triton kernels of a step without programmatic dependent launch, "
                                    "which is on by default on Hopper and later GPUs: there each kernel may be "
                                    "scheduled while the one before it finishes (1-3%% faster decode at batch 1)")
    random_seed: int = _opt(0, "seed for requests that do not give one")
    tp_size: int = _opt(1, "tensor-parallel size")
    ep_size: int = _opt(1, "expert-parallel size, inside the TP group (must divide --tp-size): a mixture-of-experts "
                           "model's experts are split over this many groups of its TP ranks")
    pp_size: int = _opt(1, "pipeline-parallel size")
    pp_max_micro_batch_size: int | None = _opt(None, "most requests in one pipeline micro-batch (default: "
                                                     "max running requests / pp size)")
    pp_layer_partition: str | None = _opt(None, "layers per pipeline stage, e.g. 15,15,15,16 (default: even, the "
                                                "remainder on the last stages)")
    dp_size: int = _opt(1, "data-parallel size: replicas of the tp x pp model behind one endpoint")
    load_balance_method: str = _opt("cache_aware", "how the DP controller picks a replica (dp > 1): cache_aware "
                                                   "(longest cached prefix unless that replica is overloaded), "
                                                   "round_robin, total_requests or total_tokens (the least loaded)")
    base_gpu_id: int = _opt(0, "first GPU this node uses")
    gpu_id_step: int = _opt(1, "GPU id distance between consecutive ranks")
    nnodes: int = _opt(1, "number of nodes")
    node_rank: int = _opt(0, "this node's index")
    dist_init_addr: str | None = _opt(None, "node 0's host:port: the ranks' rendezvous store there, and with "
                                            "several nodes the ports after it (default: 127.0.0.1, a free port)")
    dist_timeout: float | None = _opt(None, "seconds the start-up rendezvous, any collective and (with several "
                                            "nodes) the node heartbeats may wait before the deployment fails "
                                            "(default: 120 with several nodes, torch's default on one)")
    dist_ifname: str | None = _opt(None, "network interface for gloo/NCCL sockets (default: the one holding this "
                                         "node's address; lo on one node)")
    watchdog_timeout: float = _opt(300.0, "seconds a scheduler may make no progress before the deployment fails "
                                          "(a hung or stopped rank)")
    host: str = _opt("127.0.0.1", "HTTP/gRPC listen address")
    port: int = _opt(30000, "HTTP/gRPC listen port")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on the API")
    max_request_bytes: int = _opt(32 * 1024 * 1024, "largest HTTP request body; larger ones get 413 before they "
                                                    "are read")
    served_model_name: str | None = _opt(None, "model name in the API (default: the model path's name)")
    grpc_mode: bool = _opt(False, "serve gRPC instead of HTTP")
    cpu_threads: int | None = _opt(None, "torch threads of each scheduler process on CPU (default: $OMP_NUM_THREADS "
                                         "if set, else this machine's cores divided among this node's ranks)")
    log_level: str = _opt("info", "logging level")
    log_level_http: str | None = _opt(None, "logging level of the HTTP server (at info it logs every request; "
                                            "warning silences that); default: --log-level")
    show_progress: bool = _opt(True, "progress bars while loading")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        unset_allowed = {f.name for f in dataclasses.fields(self) if f.default is None}  # optional flags
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices and not (value is None and name in unset_allowed):
                raise ValueError(f"--{name.replace('_', '-')} must be one of {choices}, got {value!r}")
        positive = ["cpu_threads", "max_queued_requests",
                    "max_request_bytes", "context_length", "max_total_tokens", "max_running_requests",
                    "max_prefill_tokens", "cuda_graph_max_bs", "piecewise_cuda_graph_max_tokens",
                    "pp_max_micro_batch_size"]
        for name in positive:
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError(f"--chunked-prefill-size must be > 0 or -1, got {self.chunked_prefill_size}")
        if self.disable_overlap_schedule and self.enable_overlap_schedule:
            raise ValueError("--disable-overlap-schedule and --enable-overlap-schedule contradict each other")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if self.schedule_conservativeness <= 0:
            raise ValueError(f"--schedule-conservativeness must be > 0, got {self.schedule_conservativeness}")
        for name in ("tp_size", "ep_size", "pp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tp_size % self.ep_size:
            raise ValueError(f"--ep-size {self.ep_size} must divide --tp-size {self.tp_size}: the experts are split "
                             "inside the TP group")
        self.load_balance_method = _LOAD_BALANCE_ALIASES.get(self.load_balance_method, self.load_balance_method)
        if self.pp_layer_partition is not None:
            parts = self.pp_layer_partition.split(",")
            if not all(p.strip().isdigit() and int(p) > 0 for p in parts) or len(parts) != self.pp_size:
                raise ValueError(f"--pp-layer-partition must be {self.pp_size} positive layer counts separated by "
                                 f"commas (one per stage), got {self.pp_layer_partition!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr host:port (node 0's address)")
        if self.dist_init_addr and ":" not in self.dist_init_addr:
            raise ValueError(f"--dist-init-addr must be host:port, got {self.dist_init_addr!r}")
        if self.watchdog_timeout <= 0:
            raise ValueError(f"--watchdog-timeout must be > 0 seconds, got {self.watchdog_timeout}")
        if self.dist_timeout is not None and self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.base_gpu_id < 0 or self.gpu_id_step < 1:
            raise ValueError("--base-gpu-id must be >= 0 and --gpu-id-step >= 1")

    @property
    def prefill_token_budget(self) -> int:
        """The most new tokens one prefill batch computes: --max-prefill-tokens, capped by the chunk size."""
        if self.chunked_prefill_size > 0:
            return min(self.max_prefill_tokens, self.chunked_prefill_size)
        return self.max_prefill_tokens

    def threads_per_rank(self, ranks_per_node: int) -> int:
        """Torch threads of one CPU rank: --cpu-threads, else $OMP_NUM_THREADS (the user's cap on a shared
        machine), else the cores shared between this node's ranks instead of oversubscribing them."""
        if self.cpu_threads:
            return self.cpu_threads
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) > 0:
            return int(omp)
        return max(1, (os.cpu_count() or 1) // ranks_per_node)

    @property
    def effective_dist_timeout(self) -> float | None:
        return self.dist_timeout if self.dist_timeout is not None or self.nnodes == 1 else 120.0

    @property
    def pp_partition(self) -> list[int] | None:
        """--pp-layer-partition as layer counts, or None for the even split."""
        return None if self.pp_layer_partition is None else [int(p) for p in self.pp_layer_partition.split(",")]

    @property
    def model_name(self) -> str:
        """The name clients use for this model."""
        if self.served_model_name:
            return self.served_model_name
        if self.model_path is None:
            return "SmolLM2-135M-Instruct"
        return os.path.basename(os.path.normpath(self.model_path)).removesuffix(".gguf")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip_groups: tuple[str, ...] = (),
                     defaults: dict | None = None) -> None:
        """Every field as a flag, in GROUPS' sections, with its default in the help (except skip_groups').
        Skipped fields keep their defaults in the parsed namespace, so from_cli_args still finds them.
        `defaults` overrides fields' defaults for this command."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        default = {**{n: f.default for n, f in fields.items()}, **(defaults or {})}
        for title, names in GROUPS.items():
            if title in skip_groups:
                parser.set_defaults(**{n: default[n] for n in names})
                continue
            group = parser.add_argument_group(f"{title} options")
            for name in names:
                _add_flag(group, fields[name], default[name])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _shown(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _add_flag(group, f: dataclasses.Field, default) -> None:
    flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
    help = f.metadata.get("help", "")
    kind = _scalar_type(f.type)
    if default is not None and "default" not in help:
        help += f" (default: {_shown(default)})"
    if kind is bool:
        group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
    else:
        group.add_argument(*flags, dest=f.name, type=kind, default=default, choices=_CHOICES.get(f.name),
                           help=help)
