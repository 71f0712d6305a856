"""What OpenAI responses say about finished generations: finish reasons, usage, and logprobs with each token's
text and raw bytes."""

import functools
import math

# Most alternatives per token a client may ask for (OpenAI's own limit for chat's top_logprobs).
MAX_TOP_LOGPROBS = 20
# JSON has no -inf; a token the model rules out gets this instead (vLLM's convention).
MIN_LOGPROB = -9999.0


def matched_stop(out: dict) -> int | str | None:
    """What stopped a request (SGLang's `matched_stop`): the stop token id or the stop string; None otherwise."""
    reason = out["meta_info"]["finish_reason"]
    return reason.get("matched") if reason is not None and reason["type"] == "stop" else None


def finish_reason(out: dict) -> str | None:
    reason = out["meta_info"]["finish_reason"]
    return None if reason is None else ("length" if reason["type"] == "length" else "stop")


def usage(finals: list[dict], n: int) -> dict:
    """OpenAI usage over every choice: each prompt counts once (its n choices share it)."""
    prompt = cached = completion = 0
    for start in range(0, len(finals), n):
        group = [o["meta_info"] for o in finals[start:start + n]]
        prompt += group[0]["prompt_tokens"]
        cached += min(max(m["cached_tokens"] for m in group), group[0]["prompt_tokens"])
        completion += sum(m["completion_tokens"] for m in group)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- logprobs -------------------------------------------------------------------------------------------
def clamp_logprob(lp: float) -> float:
    return lp if math.isfinite(lp) else (MIN_LOGPROB if lp < 0 else 0.0)


class TokenStrings:
    """Text and raw bytes of single tokens, for logprobs. Bytes are exact for byte-level BPE tokenizers (a
    token may hold half a UTF-8 character, which its decoded text shows as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)
        self._byte_decoder = _byte_decoder() if self._is_byte_level() else None

    def _is_byte_level(self) -> bool:
        try:
            ids = self.tokenizer.encode(" a b", add_special_tokens=False)
            return any(t.startswith("Ġ") for t in self.tokenizer.convert_ids_to_tokens(ids))
        except Exception:  # noqa: BLE001 - an unusual tokenizer just gets UTF-8 of the decoded text
            return False

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is not None and all(c in self._byte_decoder for c in piece):
                return [self._byte_decoder[c] for c in piece]
        return list(self._text(token_id).encode("utf-8"))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: printable bytes map to themselves, the rest to
    characters from U+0100 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def new_logprobs(out: dict, start: int) -> tuple[list[tuple[float, int]], list[list[tuple[float, int]]]]:
    """The chosen tokens' (logprob, id) and their top alternatives, from token `start` on."""
    meta = out["meta_info"]
    return meta["output_token_logprobs"][start:], meta["output_top_logprobs"][start:]
