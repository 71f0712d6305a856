"""Prometheus metrics of the front end, named `gridserve:*` after SGLang's `sglang:*`. The schedulers' gauges
carry a `dp_rank` label (one series per DP replica); the front end's counters and histograms are whole."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from gridserve.messages import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                  0.75, 1.0, 2.5)


_QUEUE_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# A `*_created` series per counter and histogram (their start times) is noise on every dashboard.
disable_created_metrics()


class Metrics:
    def __init__(self, model_name: str, dp_size: int = 1):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r, self.labels = self.registry, {"model_name": model_name}

        def gauge(name, doc):  # a scheduler's figure: one series per DP replica
            return Gauge(f"gridserve:{name}", doc, [*labels, "dp_rank"], registry=r, multiprocess_mode="mostrecent")

        def counter(name, doc):
            return Counter(f"gridserve:{name}", doc, labels, registry=r).labels(**self.labels)

        def histogram(name, doc, buckets):
            return Histogram(f"gridserve:{name}", doc, labels, buckets=buckets, registry=r).labels(**self.labels)

        self.num_running_reqs = gauge("num_running_reqs", "Requests running (prefilling or decoding).")
        self.num_queue_reqs = gauge("num_queue_reqs", "Requests waiting in the scheduler's queue.")
        self.token_usage = gauge("token_usage", "Fraction of KV cache slots held by requests.")
        self.cache_hit_rate = gauge("cache_hit_rate", "Prompt tokens served from the prefix cache / all prompt tokens.")
        self.num_retracted_reqs = gauge("num_retracted_reqs", "Requests retracted because the KV cache was full "
                                                              "(since start).")
        self.num_used_tokens = gauge("num_used_tokens", "KV cache slots held by requests.")
        self.max_total_num_tokens = gauge("max_total_num_tokens", "KV cache size in tokens.")
        self.gen_throughput = gauge("gen_throughput", "Decode throughput over the last log interval (tokens/s).")
        self.num_queue_full = gauge("num_queue_full_requests", "Requests refused because the waiting queue was full "
                                    "(--max-queued-requests; since start).")
        self.queue_time = histogram("queue_time_seconds", "Time a request waited before its first prefill.",
                                    _QUEUE_BUCKETS)
        for dp_rank in range(dp_size):  # every replica's series exists (at 0) before its first report
            self.on_scheduler_stats(SchedulerStats(dp_rank=dp_rank))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.cached_tokens = counter("cached_tokens", "Prompt tokens served from the prefix cache.")
        self.num_requests = counter("num_requests", "Requests finished.")
        self.num_aborted_requests = counter("num_aborted_requests", "Requests aborted (client gone, or error).")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", _TOKEN_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             _LATENCY_BUCKETS)

    def on_scheduler_stats(self, s: SchedulerStats) -> None:
        replica = {**self.labels, "dp_rank": str(s.dp_rank)}
        self.num_running_reqs.labels(**replica).set(s.num_running)
        self.num_queue_reqs.labels(**replica).set(s.num_waiting)
        self.token_usage.labels(**replica).set(s.token_usage)
        self.cache_hit_rate.labels(**replica).set(s.cache_hit_rate)
        self.num_retracted_reqs.labels(**replica).set(s.num_retracted)
        self.num_used_tokens.labels(**replica).set(s.used_tokens)
        self.max_total_num_tokens.labels(**replica).set(s.max_total_num_tokens)
        self.gen_throughput.labels(**replica).set(s.gen_throughput)
        self.num_queue_full.labels(**replica).set(s.num_queue_full)
        for t in s.queue_times:
            self.queue_time.observe(t)

    def on_finished(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, ttft: float | None,
                    e2e: float, aborted: bool) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        (self.num_aborted_requests if aborted else self.num_requests).inc()
        self.e2e.observe(e2e)
        if ttft is not None and completion_tokens > 1:
            self.tpot.observe((e2e - ttft) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
