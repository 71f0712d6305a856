"""The sampler's draw as one Triton kernel: argmax over tokens of p / E, E = -log(U), with the same
counter-based uniforms as `sampler.random_uniforms`; or, straight from the logits when no top-k/top-p/min-p
filter applies, argmax of logit / T - log(E), the same draw in log space without a softmax pass.

Written in PyTorch the draw is ~40 int64 elementwise passes over a (batch, vocab) table; at batch 256 and
Qwen3's 152k vocabulary that was 3.9 ms a step, a third of `bench offline` (profile in docs/benchmarks.md).
Here each program hashes and scores one chunk of one row in registers and writes its best (score, token);
a tiny argmax over the chunks finishes the row. The uniforms are bit-identical to the PyTorch ones (pure
integer hashing, exact float conversion); only -log(U) may round differently, so a row picks another token
only when two scores tie to within a rounding error.
"""

import torch
import triton
import triton.language as tl

CHUNK = 8192  # tokens per program
TILE = 1024  # tokens per loop iteration


@triton.jit
def _mix32(x):
    # lowbias32 on uint32: multiplication wraps mod 2**32 as the PyTorch reference's 16-bit halves emulate
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _lanes(v):
    # the low and high 32-bit lanes of an int64 (sign bits included, as `& 0xFFFFFFFF` after `>>` keeps them)
    lo = (v & 0xFFFFFFFF).to(tl.uint32)
    hi = ((v >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return lo, hi


@triton.jit(do_not_specialize_on_alignment=["Seeds", "Steps", "Temps"])  # rows of one copy: alignment varies
def _race_kernel(Probs, Seeds, Steps, Temps, BestScore, BestIdx, V, stride_p, stride_b,
                 SEED_SALT: tl.constexpr, TOKEN_SALT: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
                 FROM_LOGITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.load(Temps + row) if FROM_LOGITS else 1.0
    chunk = tl.program_id(1)
    seed_lo, seed_hi = _lanes(tl.load(Seeds + row))
    step_lo, step_hi = _lanes(tl.load(Steps + row))
    key = _mix32(seed_lo ^ tl.full([], SEED_SALT, tl.uint32))
    key = _mix32(key ^ seed_hi)
    key = _mix32(key ^ step_lo)
    key = _mix32(key ^ step_hi)

    best = tl.full([TILE], float("-inf"), tl.float32)
    best_i = tl.zeros([TILE], tl.int32)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, V), TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < V
        p = tl.load(Probs + row * stride_p + offs, mask=mask, other=0.0).to(tl.float32)
        tok = _mix32(offs.to(tl.uint32) ^ tl.full([], TOKEN_SALT, tl.uint32))
        bits = _mix32(key ^ tok)
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
        if FROM_LOGITS:
            score = tl.where(mask, p * inv_t - tl.log(-tl.log(u)), float("-inf"))
        else:
            score = tl.where(mask, p / -tl.log(u), float("-inf"))
        better = score > best  # strict: an earlier token keeps a tie, as torch.argmax does
        best = tl.where(better, score, best)
        best_i = tl.where(better, offs, best_i)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, best_i, 2147483647), 0)
    tl.store(BestScore + row * stride_b + chunk, top)
    tl.store(BestIdx + row * stride_b + chunk, first)


def race_argmax(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, seed_salt: int,
                token_salt: int, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise argmax of probs / -log(U) with U the counter-based uniforms of (seeds[i], steps[i], token).
    probs (B, V) float (rows need not sum to 1); seeds, steps (B,) int64. Returns (B,) int64 token ids.
    With temperatures (B,) or (B, 1), `probs` are logits and the score is logit / T - log(-log(U))."""
    b, v = probs.shape
    if probs.stride(1) != 1:
        probs = probs.contiguous()
    chunks = triton.cdiv(v, CHUNK)
    best = torch.empty((b, chunks), dtype=torch.float32, device=probs.device)
    best_idx = torch.empty((b, chunks), dtype=torch.int32, device=probs.device)
    temps = seeds if temperatures is None else temperatures.reshape(-1).float().contiguous()
    if b:
        _race_kernel[(b, chunks)](probs, seeds, steps, temps, best, best_idx, v, probs.stride(0), chunks,
                                  SEED_SALT=seed_salt, TOKEN_SALT=token_salt, CHUNK=CHUNK, TILE=TILE,
                                  FROM_LOGITS=temperatures is not None)
    return best_idx.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).long()
