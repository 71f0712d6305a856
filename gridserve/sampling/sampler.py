"""Batched sampling over (B, V) logits with per-request parameters.

Pipeline per row: penalties -> (greedy: argmax) | (temperature -> softmax -> top_k -> top_p -> min_p -> draw).

Randomness is counter-based: the noise for (row, token) is a pure integer hash of
(request seed, request output step, token id). A request therefore samples the same tokens no matter
which other requests share its batch, where it sits in the batch, which device runs it, or which
tensor-parallel rank computes it, and there is no generator state to keep in sync or to restore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridserve.sampling.sampling_params import SamplingParams
from gridserve.tensor_utils import to_device

_MASK32 = 0xFFFFFFFF
# Distinct odd constants keep the seed, step and token lanes from cancelling each other when xored.
_SEED_SALT = 0x9E3779B9
_TOKEN_SALT = 0x85EBCA6B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), computed in 16-bit halves so no int64 product exceeds 2**49."""
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (hi + (x & 0xFFFF) * c) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, "lowbias32" constants); a bijection on [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape (B, V): entry [i, t] depends only on (seeds[i], steps[i], t).

    seeds and steps are int64 (B,). Every intermediate is kept in [0, 2**32) so the int64 ops are exact
    on any backend.
    """
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    step_lo, step_hi = steps & _MASK32, (steps >> 32) & _MASK32
    # Per-row key: chain the four 32-bit lanes through the mixer (cheap, only B elements).
    key = _mix32(seed_lo ^ _SEED_SALT)
    key = _mix32(key ^ seed_hi)
    key = _mix32(key ^ step_lo)
    key = _mix32(key ^ step_hi)
    tok = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) ^ _TOKEN_SALT)
    bits = _mix32(key[:, None] ^ tok[None, :])  # the only (B, V)-sized hashing
    # Top 23 bits + 0.5 ulp: exactly representable in float32 and strictly inside (0, 1).
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of probs / E with E = -log(U) ~ Exp(1): token i wins with probability p_i / sum(p).
    On CUDA one fused kernel (sampling/race_kernel.py) draws the same uniforms in registers."""
    if probs.is_cuda:
        from gridserve.sampling.race_kernel import race_argmax

        return race_argmax(probs, seeds, steps, _SEED_SALT, _TOKEN_SALT)
    return (probs / -torch.log(random_uniforms(seeds, steps, probs.shape[1]))).argmax(dim=-1)


def exponential_race_logits(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                            steps: torch.Tensor) -> torch.Tensor:
    """The same draw as exponential_race(softmax(logits / T)), in log space: argmax of logits / T - log(E).
    It skips the softmax pass over the (batch, vocab) table when no filter needs probabilities."""
    if logits.is_cuda:
        from gridserve.sampling.race_kernel import race_argmax

        return race_argmax(logits, seeds, steps, _SEED_SALT, _TOKEN_SALT, temperatures)
    e = -torch.log(random_uniforms(seeds, steps, logits.shape[1]))
    return (logits / temperatures - torch.log(e)).argmax(dim=-1)


def _to_int64(v: int) -> int:
    # Seeds may be given signed or unsigned; reduce mod 2**64 into int64's range.
    return ((v + 2**63) % 2**64) - 2**63


@dataclass
class SamplingBatchInfo:
    vocab_size: int
    temperatures: torch.Tensor  # (B, 1) float32; 1.0 on greedy rows (they never use it)
    top_ps: torch.Tensor  # (B, 1) float32
    top_ks: torch.Tensor  # (B, 1) int64; vocab_size when disabled
    min_ps: torch.Tensor  # (B, 1) float32
    seeds: torch.Tensor  # (B,) int64
    steps: torch.Tensor  # (B,) int64
    greedy_mask: torch.Tensor  # (B,) bool
    # Host-side flags so the sampler can skip work without reading device tensors (no sync).
    is_all_greedy: bool
    has_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    # Penalties; None when no row in the batch uses them.
    repetition_penalties: torch.Tensor | None = None  # (B, 1) float32
    repetition_mask: torch.Tensor | None = None  # (B, V) bool: token seen in prompt + output
    frequency_penalties: torch.Tensor | None = None  # (B, 1) float32
    presence_penalties: torch.Tensor | None = None  # (B, 1) float32
    output_counts: torch.Tensor | None = None  # (B, V) float32: occurrences in output

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        pending_tokens: torch.Tensor | None = None,
    ) -> SamplingBatchInfo:
        """steps[i] is how many tokens request i has generated so far (its RNG counter).

        prompt_ids/output_ids are only read for rows with an active penalty; other rows may pass [].
        pending_tokens (B,) on the device, -1 where absent, holds each row's newest output token when the host
        does not know it yet (the overlap loop); penalties count it like the tokens in output_ids.
        """
        b = len(params)
        if not (len(seeds) == len(steps) == b):
            raise ValueError("params, seeds and steps must have one entry per request")
        v = vocab_size
        device = torch.device(device)
        greedy = [p.is_greedy for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        # Two host-to-device copies per batch (floats, integers) instead of one per field.
        floats = to_device([[1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                            [p.top_p for p in params], [p.min_p for p in params]], torch.float32, device)
        ints = to_device([[v if p.top_k == -1 else min(p.top_k, v) for p in params],
                          [_to_int64(s) for s in seeds], list(steps), [int(g) for g in greedy]],
                         torch.int64, device)
        info = cls(
            vocab_size=v,
            temperatures=floats[0].view(b, 1),
            top_ps=floats[1].view(b, 1),
            top_ks=ints[0].view(b, 1),
            min_ps=floats[2].view(b, 1),
            seeds=ints[1],
            steps=ints[2],
            greedy_mask=ints[3].bool(),
            is_all_greedy=all(greedy),
            has_greedy=any(greedy),
            need_top_k=any(p.top_k != -1 and p.top_k < v for p in sampled),
            need_top_p=any(p.top_p < 1.0 for p in sampled),
            need_min_p=any(p.min_p > 0.0 for p in sampled),
        )

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device).view(b, 1)

        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep_rows:
            info.repetition_penalties = col([p.repetition_penalty for p in params], torch.float32)
            seqs = [list(prompt_ids[i]) + list(output_ids[i]) for i in rep_rows]
            info.repetition_mask = _scatter_tokens(rep_rows, seqs, b, v, device, torch.bool, pending_tokens)

        fp_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if fp_rows:
            info.frequency_penalties = col([p.frequency_penalty for p in params], torch.float32)
            info.presence_penalties = col([p.presence_penalty for p in params], torch.float32)
            seqs = [list(output_ids[i]) for i in fp_rows]
            info.output_counts = _scatter_tokens(fp_rows, seqs, b, v, device, torch.float32, pending_tokens)
        return info


def _scatter_tokens(
    rows: list[int], seqs: list[list[int]], b: int, v: int, device: torch.device | str, dtype: torch.dtype,
    pending_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """(b, v) table of token occurrences: counts for float dtype, presence for bool. Pending tokens are counted
    on every row; rows without the penalty ignore the table, so only the listed rows matter."""
    device = torch.device(device)
    row_idx = to_device([r for r, s in zip(rows, seqs, strict=True) for _ in s], torch.int64, device)
    tok_idx = to_device([t for s in seqs for t in s], torch.int64, device)
    # Ids past the logits width (embedding vocab larger than lm_head) cannot be sampled: park them in an
    # extra column that is dropped, instead of failing.
    tok_idx = tok_idx.clamp(max=v)
    table = torch.zeros(b, v + 1, dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    table.index_put_((row_idx, tok_idx), one, accumulate=dtype != torch.bool)
    if pending_tokens is not None:
        cols = torch.where(pending_tokens >= 0, pending_tokens.clamp(max=v), v)
        table.index_put_((torch.arange(b, device=device), cols), one, accumulate=dtype != torch.bool)
    return table[:, :v]


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32
    top_logprobs_val: torch.Tensor | None  # (B, K)
    top_logprobs_idx: torch.Tensor | None  # (B, K) int64

    def copy_to_host(self) -> HostSampleOutput:
        """Starts the device-to-host copies without waiting for them (pinned buffers and an event on CUDA)."""
        fields = (self.next_token_ids, self.logprobs, self.top_logprobs_val, self.top_logprobs_idx)
        if self.next_token_ids.device.type != "cuda":
            return HostSampleOutput(tuple(t if t is None else t.cpu() for t in fields), None)
        host = []
        for t in fields:
            if t is not None:
                dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                dst.copy_(t, non_blocking=True)
                t = dst
            host.append(t)
        event = torch.cuda.Event()
        event.record()
        return HostSampleOutput(tuple(host), event)


@dataclass
class HostSampleOutput:
    tensors: tuple  # SampleOutput's fields on the host (possibly still being written until `event`)
    event: object

    def wait(self) -> tuple[list, list | None, list | None, list | None]:
        """The sampled ids (and logprobs) as lists, once the device has produced them."""
        if self.event is not None:
            self.event.synchronize()
        return tuple(None if t is None else t.tolist() for t in self.tensors)


def apply_penalties(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Return penalised logits (out of place; the caller's tensor is left untouched)."""
    if info.repetition_mask is not None:
        # HF semantics: shrink towards zero for positive logits, push further down for negative ones.
        pen = info.repetition_penalties
        penalised = torch.where(logits < 0, logits * pen, logits / pen)
        logits = torch.where(info.repetition_mask, penalised, logits)
    if info.output_counts is not None:
        counts = info.output_counts
        logits = logits - counts * info.frequency_penalties - (counts > 0) * info.presence_penalties
    return logits


def _filtered_probs(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Temperature, softmax, then top_k / top_p / min_p; masked tokens get probability 0 (unnormalised)."""
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    if info.need_top_k or info.need_top_p:
        # Stable sort: ties break by token id, so the kept set never depends on the batch.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        if info.need_top_k:
            ranks = torch.arange(probs.shape[-1], device=probs.device)
            sorted_probs = sorted_probs.masked_fill(ranks[None, :] >= info.top_ks, 0.0)
        if info.need_top_p:
            # top_p is measured against the mass left after top_k (i.e. renormalised, as HF/vLLM do).
            # Keep a token while the mass strictly before it is < top_p: the smallest set reaching top_p,
            # and always the top token. Rows with top_p == 1 are exempt so float rounding never trims them.
            cum = sorted_probs.cumsum(dim=-1)
            drop = (cum - sorted_probs >= info.top_ps * cum[:, -1:]) & (info.top_ps < 1.0)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if info.need_min_p:
        # The top token survives top_k/top_p, so the row max is still the unfiltered max prob.
        probs = probs.masked_fill(probs < info.min_ps * probs.amax(dim=-1, keepdim=True), 0.0)
    # No renormalisation needed: the draw below is invariant to scaling a row.
    return probs


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        info: SamplingBatchInfo,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> SampleOutput:
        """Pick one token per row. Logprobs (when asked) come from the raw logits, before any processing.

        return_logprob gives the chosen token's logprob; top_logprobs_num > 0 gives the top-K, K being the
        largest number requested in the batch (callers slice per request).
        """
        if logits.dim() != 2 or logits.shape[1] != info.vocab_size or logits.shape[0] != info.seeds.shape[0]:
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match the batch info")
        if (info.is_all_greedy and info.repetition_mask is None and info.output_counts is None
                and not (return_logprob or top_logprobs_num > 0)):
            # The argmax of the model's own dtype: widening bf16 to float is exact and keeps order and ties, so
            # this is the same token without the float copy (a kernel of a batch-1 step).
            return SampleOutput(logits.argmax(dim=-1), None, None, None)
        logits = logits.float()
        penalised = apply_penalties(logits, info)

        if info.is_all_greedy:
            next_ids = penalised.argmax(dim=-1)
        elif info.need_top_k or info.need_top_p or info.need_min_p:
            next_ids = exponential_race(_filtered_probs(penalised, info), info.seeds, info.steps)
        else:
            next_ids = exponential_race_logits(penalised, info.temperatures, info.seeds, info.steps)
        if info.has_greedy and not info.is_all_greedy:
            next_ids = torch.where(info.greedy_mask, penalised.argmax(dim=-1), next_ids)

        logprobs = top_val = top_idx = None
        if return_logprob or top_logprobs_num > 0:
            raw = torch.log_softmax(logits, dim=-1)
            if return_logprob:
                logprobs = raw.gather(-1, next_ids[:, None]).squeeze(-1)
            if top_logprobs_num > 0:
                top_val, top_idx = raw.topk(min(top_logprobs_num, info.vocab_size), dim=-1, sorted=True)
        return SampleOutput(next_ids, logprobs, top_val, top_idx)
