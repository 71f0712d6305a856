"""One fixed sequence of model forwards over the paged KV cache (batched prefill, prefix extend, decode),
run the same way at any tensor- or pipeline-parallel size, returning the logits of every step."""

import torch

from gridserve.forward_batch import ForwardBatch, ForwardMode
from gridserve.model_executor.model_runner import ModelRunner
from gridserve.model_loader.loader import load_model_config
from gridserve.server_args import ServerArgs

PROMPTS = [[(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate((11, 5, 23))]
DECODE = [[17, 29, 31], [101, 103, 107], [191, 193, 197]]  # fixed next tokens, so no argmax near-tie matters


def make_runner(path: str, tp_size: int = 1, load_format: str = "auto", attention_backend: str = "torch",
                device: str = "cpu", ep_size: int = 1, quantization: str | None = None) -> ModelRunner:
    args = ServerArgs(model_path=path, dtype="float32", device=device, max_total_tokens=512, tp_size=tp_size,
                      ep_size=ep_size, max_running_requests=8, show_progress=False, load_format=load_format,
                      attention_backend=attention_backend, quantization=quantization)
    return ModelRunner(args, path, load_model_config(path))


def forward(runner: ModelRunner, mode, rows, new_ids, prefix_lens, all_logits=False) -> torch.Tensor:
    pool = runner.req_to_token_pool.req_to_token
    ids, pos, locs, seq_lens = [], [], [], []
    for row, new, prefix in zip(rows, new_ids, prefix_lens, strict=True):
        slots = runner.allocator.alloc(len(new))
        pool[row, prefix : prefix + len(new)] = slots.to(torch.int32)
        ids += new
        pos += range(prefix, prefix + len(new))
        locs.append(slots)
        seq_lens.append(prefix + len(new))
    dev = runner.device
    fb = ForwardBatch(
        forward_mode=mode, batch_size=len(rows), input_ids=torch.tensor(ids, device=dev),
        positions=torch.tensor(pos, device=dev), req_pool_indices=torch.tensor(rows, device=dev),
        seq_lens=torch.tensor(seq_lens, device=dev), out_cache_loc=torch.cat(locs),
        seq_lens_cpu=seq_lens, extend_seq_lens_cpu=[len(x) for x in new_ids], return_all_logits=all_logits)
    if runner.pp.size > 1:  # every stage runs its layers; only the last one has logits
        out = runner.forward_stage(fb)
        return None if out is None else out.cpu()
    return runner.forward(fb).cpu()


def run_script(runner: ModelRunner) -> list[torch.Tensor]:
    out = []
    rows = [runner.req_to_token_pool.alloc() for _ in PROMPTS]
    out.append(forward(runner, ForwardMode.EXTEND, rows, PROMPTS, [0, 0, 0], all_logits=True))
    rows2 = [runner.req_to_token_pool.alloc() for _ in PROMPTS]
    pool = runner.req_to_token_pool.req_to_token
    cut = [4, 2, 10]
    for r_old, r_new, c in zip(rows, rows2, cut, strict=True):
        pool[r_new, :c] = pool[r_old, :c]
    out.append(forward(runner, ForwardMode.EXTEND, rows2, [p[c:] for p, c in zip(PROMPTS, cut, strict=True)], cut))
    lens = [len(p) for p in PROMPTS]
    for step in range(3):
        toks = [[d[step]] for d in DECODE]
        out.append(forward(runner, ForwardMode.DECODE, rows2, toks, lens))
        lens = [n + 1 for n in lens]
    return out
