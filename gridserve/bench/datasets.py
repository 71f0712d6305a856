"""Workloads of `gridserve bench serving`: SGLang's synthetic `random` and `generated-shared-prefix` datasets, and
`sharegpt`, real conversations from a local file in ShareGPT's format (what SGLang's and vLLM's benchmarks use by
default; they download it, this reads `--dataset-path`).

Prompt format. The completions endpoint accepts a list of token ids as `prompt`, so by default (`--prompt-format
auto`) prompts for /v1/completions are sent as token ids: the input length is then exact, with no tokenizer and
no retokenization drift. The chat endpoint only takes text: with `--tokenizer` the text is random token ids
decoded (SGLang's way; its length is counted by retokenizing), without one it is random common English words
(about one token each; the token counts reported by the server in `usage` are what the metrics use). ShareGPT
prompts are their text, or its token ids with `--prompt-format token-ids`.
"""

import argparse
import json
import random
from dataclasses import dataclass

# Random token ids are drawn from [0, min(vocab, MAX_TOKEN_ID)) minus special tokens: low ids are ordinary tokens
# in every supported tokenizer, and without a tokenizer we do not know the vocabulary size.
MAX_TOKEN_ID = 10000

WORDS = (
    "the of and to in is was for on that with as by at from his her it an be this which or are had not but "
    "first one their were all new has its also two after more time other when would who there been into year "
    "city world state over school only may people most between during under three about such years later "
    "while where many both part some before then than known since made used each water house river line "
    "country music family south north east west history group local game team second found work government "
    "early small large great public village through number center area power market light book field "
    "road church paper night story order space plant stone sound green table window garden letter morning"
).split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # exact for token ids; retokenized or estimated (one per word) for text
    output_len: int


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=("random", "generated-shared-prefix", "sharegpt"), default="random")
    g.add_argument("--dataset-path", help="sharegpt: a JSON list of {'conversations': [{'value': ...}, ...]}")
    g.add_argument("--num-prompts", type=int, default=200, help="requests of the random and sharegpt datasets")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=1024)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * ratio, len] (SGLang's semantics; 1 = fixed lengths)")
    g.add_argument("--gsp-num-groups", type=int, default=64, help="groups sharing one system prompt")
    g.add_argument("--gsp-prompts-per-group", type=int, default=16)
    g.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    g.add_argument("--gsp-question-len", type=int, default=128)
    g.add_argument("--gsp-output-len", type=int, default=256)
    g.add_argument("--sharegpt-output-len", type=int,
                   help="sharegpt: every request's output tokens (default: the reference answer's token count)")
    g.add_argument("--sharegpt-context-len", type=int,
                   help="sharegpt: skip conversations whose prompt and answer pass this many tokens")
    g.add_argument("--prompt-format", choices=("auto", "token-ids", "text"), default="auto",
                   help="auto: token ids for the completions endpoint (exact lengths), text for chat")


def validate_dataset_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first bad dataset flag."""
    names = ("num_prompts", "random_input_len", "random_output_len", "gsp_num_groups", "gsp_prompts_per_group",
             "gsp_system_prompt_len", "gsp_question_len", "gsp_output_len")
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {args.random_range_ratio}")
    if args.prompt_format == "token-ids" and args.endpoint == "chat":
        raise ValueError("--prompt-format token-ids needs --endpoint completions (chat messages are text)")
    for name in ("sharegpt_output_len", "sharegpt_context_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dataset_name == "sharegpt" and not (args.dataset_path and args.tokenizer):
        raise ValueError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON file) and --tokenizer (to "
                         "count the prompts' and answers' tokens)")


class PromptMaker:
    """Random prompt pieces of n tokens, as token ids or as text (see the module docstring)."""

    def __init__(self, rng: random.Random, as_ids: bool, tokenizer=None):
        self.rng, self.as_ids, self.tokenizer = rng, as_ids, tokenizer
        top = min(len(tokenizer), MAX_TOKEN_ID) if tokenizer is not None else MAX_TOKEN_ID
        special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        self.ids = [i for i in range(top) if i not in special]

    def make(self, n: int) -> str | list[int]:
        if self.as_ids:
            return [self.rng.choice(self.ids) for _ in range(n)]
        if self.tokenizer is not None:
            return self.tokenizer.decode([self.rng.choice(self.ids) for _ in range(n)])
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def length(self, prompt: str | list[int]) -> int:
        if isinstance(prompt, list):
            return len(prompt)
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(prompt, add_special_tokens=False))
        return len(prompt.split())


def sample_random(maker: PromptMaker, num: int, input_len: int, output_len: int, ratio: float) -> list[BenchRequest]:
    """SGLang's random dataset: each length uniform in [max(1, int(len * ratio)), len]."""
    rng = maker.rng
    out = []
    for _ in range(num):
        prompt = maker.make(rng.randint(max(1, int(input_len * ratio)), input_len))
        out.append(BenchRequest(prompt, maker.length(prompt), rng.randint(max(1, int(output_len * ratio)),
                                                                          output_len)))
    return out


def sample_shared_prefix(maker: PromptMaker, groups: int, per_group: int, system_len: int, question_len: int,
                         output_len: int) -> list[BenchRequest]:
    """SGLang's generated-shared-prefix dataset: every group's prompts start with the group's system prompt
    (what the radix cache can reuse); the prompts are shuffled so groups interleave as they would in traffic."""
    out = []
    for _ in range(groups):
        system = maker.make(system_len)
        for _ in range(per_group):
            question = maker.make(question_len)
            prompt = system + question if isinstance(system, list) else f"{system}\n\n{question}"
            out.append(BenchRequest(prompt, maker.length(prompt), output_len))
    maker.rng.shuffle(out)
    return out


def load_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first turn, second turn) of every conversation in a ShareGPT file that has two turns or more. Raises
    ValueError, naming the file, when it cannot be read or is not a list of conversations."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--dataset-path {path}: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            first, second = turns[0].get("value"), turns[1].get("value")
            if isinstance(first, str) and isinstance(second, str):
                pairs.append((first, second))
    return pairs


def sample_sharegpt(pairs: list[tuple[str, str]], rng: random.Random, num: int, tokenizer, as_ids: bool,
                    output_len: int | None = None, context_len: int | None = None) -> list[BenchRequest]:
    """SGLang's sharegpt sampling: the conversations in a seeded order, each prompt its first turn and its output
    length the second turn's tokens (or `output_len`); conversations with fewer than 2 tokens either way, or
    longer than `context_len` in all, are skipped. Up to `num` requests: fewer when the file runs out."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    out = []
    for i in order:
        if len(out) == num:
            break
        prompt, answer = pairs[i]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = output_len or len(tokenizer.encode(answer, add_special_tokens=False))
        if len(ids) < 2 or n_out < 2 or (context_len and len(ids) + n_out > context_len):
            continue
        out.append(BenchRequest(ids if as_ids else prompt, len(ids), n_out))
    return out


def build_requests(args: argparse.Namespace, tokenizer=None) -> list[BenchRequest]:
    """The run's requests, seeded by --seed. Raises ValueError for a ShareGPT file that yields none."""
    if args.dataset_name == "sharegpt":
        reqs = sample_sharegpt(load_sharegpt(args.dataset_path), random.Random(args.seed), args.num_prompts, tokenizer,
                               args.prompt_format == "token-ids", args.sharegpt_output_len, args.sharegpt_context_len)
        if not reqs:
            raise ValueError(f"--dataset-path {args.dataset_path}: no conversation with two turns of 2 tokens or more"
                             " (within --sharegpt-context-len)")
        return reqs
    as_ids = args.prompt_format == "token-ids" or (args.prompt_format == "auto" and args.endpoint == "completions")
    maker = PromptMaker(random.Random(args.seed), as_ids, tokenizer)
    if args.dataset_name == "random":
        return sample_random(maker, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio)
    return sample_shared_prefix(maker, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                                args.gsp_question_len, args.gsp_output_len)
