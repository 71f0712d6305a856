"""`gridserve bench serving`: a load generator for OpenAI-compatible servers (gridserve, SGLang, vLLM), modelled
on SGLang's `bench_serving` and vLLM's `benchmark_serving`: same flags where they exist, same result block.

Every request is streamed (SSE over aiohttp, the client SGLang's and vLLM's benchmarks use: httpx took 0.35-0.6 ms
more of every TTFT on a 2-core CPU, between the call and the request on the wire and between a chunk's arrival and
its line) and timed on arrival of each chunk:
- TTFT: request sent -> first chunk with non-empty content.
- ITL: gaps between consecutive content chunks. A chunk can carry several tokens (the detokenizer holds back half
  characters, empty-text tokens, a server batching its stream). When the server reports usage in every chunk
  (SGLang/vLLM `continuous_usage_stats`), a chunk of k new tokens counts as k gaps of gap/k; otherwise (gridserve,
  OpenAI) one chunk counts as one gap.
- TPOT: per request, (E2E - TTFT) / (output tokens - 1); output tokens come from the `usage` of the final chunk
  (`stream_options.include_usage`), else from --tokenizer, else the number of content chunks.
Failed requests are counted and reported, never fatal. Exit status: 0, 1 if the server cannot be reached or a run
had no successful request, 2 for bad flags.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from tqdm import tqdm

from gridserve.bench.datasets import BenchRequest, add_dataset_args, build_requests, validate_dataset_args

BACKENDS = ("gridserve", "sglang", "vllm", "openai")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# The latency sections of the result block: title, label, metric, statistics shown (all are in the JSON).
SECTIONS = (("End-to-End Latency", "E2E Latency", "e2e_latency", ("Mean", "Median", "P90", "P99")),
            ("Time to First Token", "TTFT", "ttft", ("Mean", "Median", "Std", "P99")),
            ("Time per Output Token (excl. 1st token)", "TPOT", "tpot", ("Mean", "Median", "P99")),
            ("Inter-Token Latency", "ITL", "itl", ("Mean", "Median", "P95", "P99", "Max")))
WARMUP_MAX_TOKENS = 16  # warm-up only opens connections and warms the server; no need for the full output
STREAM_LINE_BYTES = 10 << 20  # the longest SSE line read (aiohttp's default, 64 KiB, fails on large final chunks)
CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
SHORT = aiohttp.ClientTimeout(total=10)  # the calls around a run: models, counters, cache flush


def add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=BACKENDS, default="gridserve",
                   help="all speak the OpenAI API; 'openai' sends only standard fields (no ignore_eos)")
    p.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    p.add_argument("--model", help="model name sent in requests (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    p.add_argument("--tokenizer", help="tokenizer folder or .gguf, for text prompts and counting tokens when the "
                                       "server reports no usage (default: the server's usage counts)")
    add_dataset_args(p)
    g = p.add_argument_group("traffic")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (seeded); inf = all at once")
    g.add_argument("--sweep-request-rates", metavar="R1,R2,...",
                   help="one run per rate (e.g. 1,2,4,inf); --plot then draws throughput against latency")
    g.add_argument("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    g.add_argument("--seed", type=int, default=1, help="seed of the prompts, lengths and arrival times")
    g.add_argument("--disable-ignore-eos", action="store_true",
                   help="let requests stop at EOS (by default ignore_eos is sent, so output lengths are fixed)")
    g.add_argument("--warmup-requests", type=int, default=1, help="untimed requests before the run")
    g.add_argument("--disable-flush-cache", action="store_true",
                   help="gridserve/sglang: do not POST /flush_cache before each run (so the runs of a sweep do "
                        "not reuse each other's prefixes)")
    g = p.add_argument_group("report")
    g.add_argument("--output-file", help="append one JSON line per run (args and metrics), like SGLang")
    g.add_argument("--plot", metavar="PATH", help="PNG of output throughput vs. median TPOT and TTFT, one point "
                                                  "per rate (needs matplotlib)")
    g.add_argument("--disable-tqdm", action="store_true")


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--sweep-request-rates: {part.strip()!r} is not a number") from None
        if not rate > 0:
            raise ValueError(f"--sweep-request-rates: rates must be > 0, got {part.strip()}")
        rates.append(rate)
    return rates


def validate_serving_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first bad flag."""
    validate_dataset_args(args)
    if not args.request_rate > 0:  # also rejects nan
        raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {args.request_rate}")
    if args.sweep_request_rates is not None:
        parse_rates(args.sweep_request_rates)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'gridserve[bench]'") from None


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds
    first_token_at: float = 0.0  # perf_counter time of the first token (for the arrival-order check)
    latency: float = 0.0  # E2E seconds
    itl: list[float] = field(default_factory=list)
    text: str = ""


def make_body(args: argparse.Namespace, model: str, req: BenchRequest, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if args.backend != "openai":  # extensions that gridserve, SGLang and vLLM accept (the real OpenAI API does not)
        body["ignore_eos"] = not args.disable_ignore_eos
        body["stream_options"]["continuous_usage_stats"] = True
    return body


def _content(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


async def send_request(client: aiohttp.ClientSession, url: str, body: dict, req: BenchRequest,
                       count_tokens=None) -> RequestOutput:
    """One streamed request; every failure ends up in `error`, nothing is raised."""
    out, chat = RequestOutput(prompt_len=req.prompt_len), "messages" in body
    parts: list[str] = []
    usage: dict | None = None
    tokens_at_last = 0  # completion tokens (per-chunk usage) when the last content chunk arrived
    start = time.perf_counter()
    last = start
    try:
        async with client.post(url, json=body) as r:
            if r.status != 200:
                out.error = f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:300]}"
                return out
            done = False
            # Read to the stream's end, past [DONE]: a response left unread closes its connection, and each request
            # then paid for a new one inside its TTFT (~1 ms a request on a 2-core CPU).
            async for line in r.content:
                if done or not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments (keep-alives)
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk or chunk.get("object") == "error":  # OpenAI style, older vLLM style
                    out.error = f"stream error: {json.dumps(chunk.get('error', chunk))[:300]}"
                    return out
                now = time.perf_counter()
                usage = chunk.get("usage") or usage
                text = _content(chunk, chat)
                if not text:
                    continue
                tokens = (usage or {}).get("completion_tokens") if chunk.get("usage") else None
                if not parts:
                    out.ttft, out.first_token_at = now - start, now
                elif tokens is not None:
                    k = max(1, tokens - tokens_at_last)
                    out.itl.extend([(now - last) / k] * k)
                else:
                    out.itl.append(now - last)
                parts.append(text)
                last, tokens_at_last = now, tokens or 0
            if not done:
                out.error = "the stream ended without data: [DONE]"
                return out
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        out.error = f"{type(e).__name__}: {e}" if str(e) else repr(e)
        return out
    out.latency = time.perf_counter() - start
    out.text = "".join(parts)
    if not parts:
        out.ttft = out.latency  # no visible text at all: the first "token" is the end
    if usage:
        out.prompt_len = usage.get("prompt_tokens", out.prompt_len)
        out.output_len = usage.get("completion_tokens", 0)
    else:
        out.output_len = count_tokens(out.text) if count_tokens else len(parts)
    out.success = True
    return out


def _stats(values_ms: list[float], name: str) -> dict:
    a = np.asarray(values_ms or [0.0])  # SGLang reports 0 for an empty set (e.g. no request had 2 tokens)
    return {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
            f"std_{name}_ms": float(a.std()), **{f"p{q}_{name}_ms": float(np.percentile(a, q)) for q in (90, 95, 99)},
            f"max_{name}_ms": float(a.max())}


def compute_metrics(outputs: list[RequestOutput], duration: float, count_tokens=None) -> dict:
    ok = [o for o in outputs if o.success]
    total_in, total_out = sum(o.prompt_len for o in ok), sum(o.output_len for o in ok)
    e2e = [o.latency for o in ok]
    m = {"duration": duration, "completed": len(ok), "failed": len(outputs) - len(ok),
         "total_input_tokens": total_in, "total_output_tokens": total_out,
         "request_throughput": len(ok) / duration, "input_throughput": total_in / duration,
         "output_throughput": total_out / duration, "total_throughput": (total_in + total_out) / duration,
         "concurrency": sum(e2e) / duration}  # average requests in flight
    if count_tokens:
        m["total_output_tokens_retokenized"] = sum(count_tokens(o.text) for o in ok)
    per_request = {"e2e_latency": e2e, "ttft": [o.ttft for o in ok],
                   "tpot": [(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1],
                   "itl": [x for o in ok for x in o.itl]}
    for name, values in per_request.items():
        m.update(_stats([v * 1000 for v in values], name))
    m["order_violations"] = order_violations(outputs)
    m["errors"] = list(dict.fromkeys(o.error for o in outputs if not o.success))[:5]  # distinct, first few
    return m


# First tokens of one scheduler step reach the client within a few ms of each other, in any order.
ORDER_TOLERANCE_S = 0.005


def order_violations(outputs: list[RequestOutput]) -> int:
    """Requests (in the order they were sent) whose first token came more than ORDER_TOLERANCE_S before that of
    a request sent earlier: under first come first served, each one is a request that was passed over."""
    latest, count = -math.inf, 0
    for o in outputs:
        if not o.success or not o.first_token_at:
            continue
        if o.first_token_at < latest - ORDER_TOLERANCE_S:
            count += 1
        latest = max(latest, o.first_token_at)
    return count


def format_result(m: dict, backend: str, rate: float, max_concurrency: int | None) -> str:
    """SGLang bench_serving's result block, with its labels."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<40} {value:<10}")

    row("Backend:", backend)
    row("Traffic request rate:", rate)
    row("Max request concurrency:", max_concurrency or "not set")
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", f"{m['duration']:.2f}")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    if "total_output_tokens_retokenized" in m:
        row("Total generated tokens (retokenized):", m["total_output_tokens_retokenized"])
    for label, key in (("Request throughput (req/s):", "request_throughput"),
                       ("Input token throughput (tok/s):", "input_throughput"),
                       ("Output token throughput (tok/s):", "output_throughput"),
                       ("Total token throughput (tok/s):", "total_throughput"), ("Concurrency:", "concurrency")):
        row(label, f"{m[key]:.2f}")
    if "cache_hit_rate" in m:
        row("Prefix cache hit rate:", f"{m['cache_hit_rate']:.3f}")
        row("Requests per DP replica:", " ".join(map(str, m["requests_per_replica"])))
        row("Prefill steps:", m["prefill_steps"])
    row("First tokens out of arrival order:", m["order_violations"])
    for title, label, key, stats in SECTIONS:
        lines.append(f"{title:-^50}")
        for stat in stats:
            row(f"{stat} {label} (ms):", f"{m[f'{stat.lower()}_{key}_ms']:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


async def benchmark(client: aiohttp.ClientSession, args: argparse.Namespace, model: str, requests: list[BenchRequest],
                    rate: float, count_tokens=None) -> tuple[list[RequestOutput], float]:
    """Sends every request, with Poisson arrivals at `rate` (all at once if inf), at most --max-concurrency in
    flight (a request waiting for a slot is not timed yet, as in SGLang)."""
    url = args.base_url + ENDPOINTS[args.endpoint]
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc=f"rate {rate:g}", unit="req")

    async def one(req: BenchRequest) -> RequestOutput:
        async with sem or contextlib.nullcontext():
            out = await send_request(client, url, make_body(args, model, req, req.output_len), req, count_tokens)
        bar.update()
        return out

    gaps = random.Random(args.seed)
    start = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        if i and math.isfinite(rate):
            await asyncio.sleep(gaps.expovariate(rate))
        tasks.append(asyncio.create_task(one(req)))
    outputs = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return outputs, duration


async def warm_up(client: aiohttp.ClientSession, args: argparse.Namespace, model: str,
                  requests: list[BenchRequest]) -> str | None:
    """Untimed requests (the first prompts, short outputs); returns an error when every one of them failed, which
    catches a wrong --model or endpoint before the run."""
    url = args.base_url + ENDPOINTS[args.endpoint]
    warm = [requests[i % len(requests)] for i in range(args.warmup_requests)]
    outs = await asyncio.gather(*(send_request(client, url, make_body(args, model, r, min(r.output_len,
                                                                                          WARMUP_MAX_TOKENS)), r)
                                  for r in warm))
    return outs[0].error if outs and not any(o.success for o in outs) else None


# Counters of every replica in /server_info whose growth over a run gives its cache hit rate and request spread.
_REPLICA_COUNTERS = ("num_received", "prompt_tokens_total", "cached_prompt_tokens_total", "prefill_batches_total")


async def replica_counters(client: aiohttp.ClientSession, base_url: str) -> list[dict] | None:
    """Each replica's cumulative counters from a gridserve server's /server_info; None from other servers."""
    try:
        async with client.get(f"{base_url}/server_info", timeout=SHORT) as r:
            states = json.loads(await r.read())["internal_states"]
        return [{k: s[k] for k in _REPLICA_COUNTERS} for s in states]
    except (*CLIENT_ERRORS, ValueError, KeyError, TypeError):
        return None


def replica_metrics(before: list[dict], after: list[dict]) -> dict:
    """The run's prefix-cache hit rate over all replicas, and how many requests each replica took in."""
    grew = [{k: a[k] - b[k] for k in _REPLICA_COUNTERS} for b, a in zip(before, after, strict=True)]
    prompt = sum(g["prompt_tokens_total"] for g in grew)
    return {"cache_hit_rate": sum(g["cached_prompt_tokens_total"] for g in grew) / max(1, prompt),
            "requests_per_replica": [g["num_received"] for g in grew],
            "prefill_steps": sum(g["prefill_batches_total"] for g in grew)}


async def flush_cache(client: aiohttp.ClientSession, base_url: str) -> None:
    """Best effort: the server may still be freeing the last requests, so retry for a moment."""
    for _ in range(20):
        with contextlib.suppress(*CLIENT_ERRORS):
            async with client.post(f"{base_url}/flush_cache", timeout=SHORT) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    print("gridserve bench serving: warning: POST /flush_cache failed; runs may reuse cached prefixes",
          file=sys.stderr)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf": JSON has no infinity
    return value


def plot_sweep(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["output_throughput"] for r in results]
    for ax, key, label in ((axes[0], "median_tpot_ms", "median TPOT (ms)"),
                           (axes[1], "median_ttft_ms", "median TTFT (ms)")):
        ax.plot(x, [r[key] for r in results], marker="o")
        for r in results:
            ax.annotate(f"{r['request_rate']} req/s", (r["output_throughput"], r[key]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    r = results[0]
    limit = r["max_concurrency"] or "no limit"
    fig.suptitle(f"{r['backend']} {r['model']}, {r['dataset_name']}, max concurrency {limit}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def _main(args: argparse.Namespace, count_tokens, requests: list[BenchRequest]) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with open_client(headers) as client:
        model = await first_model(client, args)
        if model is None:
            return 1
        error = await warm_up(client, args, model, requests)
        if error:
            print(f"gridserve bench serving: error: warm-up request failed: {error}", file=sys.stderr)
            return 1
        rates = parse_rates(args.sweep_request_rates) if args.sweep_request_rates else [args.request_rate]
        results, status = [], 0
        for rate in rates:
            if args.backend in ("gridserve", "sglang") and not args.disable_flush_cache:
                await flush_cache(client, args.base_url)
            before = await replica_counters(client, args.base_url)
            outputs, duration = await benchmark(client, args, model, requests, rate, count_tokens)
            m = compute_metrics(outputs, duration, count_tokens)
            after = await replica_counters(client, args.base_url) if before else None
            if before and after and len(before) == len(after):
                m.update(replica_metrics(before, after))
            print(format_result(m, args.backend, rate, args.max_concurrency), flush=True)
            if m["failed"]:
                print(f"gridserve bench serving: warning: {m['failed']} requests failed, e.g. {m['errors'][0]}",
                      file=sys.stderr)
            status = status or int(m["completed"] == 0)
            result = {"backend": args.backend, "model": model, "dataset_name": args.dataset_name,
                      "request_rate": _jsonable(rate), "max_concurrency": args.max_concurrency, **m,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "args": {k: _jsonable(v) for k, v in vars(args).items() if k not in ("func", "api_key")}}
            results.append(result)
            if args.output_file:
                with open(args.output_file, "a") as f:
                    f.write(json.dumps(result) + "\n")
    if args.plot:
        plot_sweep(results, args.plot)
        print(f"plot written to {args.plot}")
    return status


def open_client(headers: dict, trace_configs: list[aiohttp.TraceConfig] | None = None) -> aiohttp.ClientSession:
    """One session for the whole run: kept-alive connections, as many as requests in flight (aiohttp's default caps
    them at 100). trace_configs: aiohttp's hooks on connections and requests (the tests count connections)."""
    return aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=6 * 3600, sock_connect=10),
                                 read_bufsize=STREAM_LINE_BYTES, trace_configs=trace_configs)


async def first_model(client: aiohttp.ClientSession, args: argparse.Namespace) -> str | None:
    """The model to send: --model, else the first id of GET /v1/models; None, after saying why on stderr, when the
    server cannot be reached, wants another API key, or names no model."""
    status = 0
    try:
        async with client.get(f"{args.base_url}/v1/models", timeout=SHORT) as r:
            status = r.status
            if status == 401:
                print(f"gridserve bench serving: error: {args.base_url} answered 401 Unauthorized: it wants an API key"
                      f"{' other than the one given' if args.api_key else ''} (--api-key, or $OPENAI_API_KEY)",
                      file=sys.stderr)
                return None
            return args.model or json.loads(await r.read())["data"][0]["id"]
    except aiohttp.ClientConnectorError as e:  # its own text names the host twice and an ssl context
        reason = os.strerror(e.os_error.errno) if e.os_error.errno else str(e.os_error)
        print(f"gridserve bench serving: error: cannot reach {args.base_url}: {reason}", file=sys.stderr)
    except CLIENT_ERRORS as e:
        print(f"gridserve bench serving: error: cannot reach {args.base_url}: {str(e) or repr(e)}", file=sys.stderr)
    except (ValueError, KeyError, IndexError, TypeError):
        print(f"gridserve bench serving: error: GET {args.base_url}/v1/models (HTTP {status}) names no model; pass "
              "--model", file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.tokenizer:
        from gridserve.tokenizer import get_tokenizer

        try:
            tokenizer = get_tokenizer(args.tokenizer)
        except Exception as e:  # noqa: BLE001 - any loading failure is a bad --tokenizer
            print(f"gridserve bench serving: error: cannot load --tokenizer {args.tokenizer}: {e}", file=sys.stderr)
            return 2
    count_tokens = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else None
    args.base_url = args.base_url.rstrip("/")
    try:
        requests = build_requests(args, tokenizer)
    except ValueError as e:  # a ShareGPT file that cannot be read or holds no usable conversation
        print(f"gridserve bench serving: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_main(args, count_tokens, requests))
