"""Host time of the scheduler's decode steps, in-process (no ZMQ, no detokenizer): where the CPU spends a
step, and whether it keeps ahead of the GPU. Usage (on a GPU machine):
    python scripts/profile_scheduler.py --model gridserve/configs/qwen3-0.6b --load-format dummy \
        --tokenizer-path TOK --batch-size 1 --input-len 256 --output-len 128 [--disable-overlap-schedule]
With --offline it runs `bench offline`'s workload instead and splits the device time of the whole run into
prefill forward, decode forward and sampling (CUDA events around each), against the wall time."""

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import time
import zlib
from collections import defaultdict

import torch

from gridserve.bench.offline import make_workload
from gridserve.messages import TokenizedGenerateReq
from gridserve.model_loader.loader import load_model_config, resolve_model_path
from gridserve.process_utils import freeze_startup_objects
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.scheduler.scheduler import Scheduler
from gridserve.server_args import ServerArgs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--repeat", type=int, default=1, help="profile this many runs (e.g. prefill only: --output-len 1)")
    p.add_argument("--kernels", action="store_true", help="also a torch.profiler table of the device's kernels")
    p.add_argument("--offline", action="store_true", help="bench offline's workload (256 prompts, 100..1024)")
    p.add_argument("--ttft", action="store_true",
                   help="time to first token in-process: batch-size - 1 requests decode while new ones arrive")
    ServerArgs.add_cli_args(p)
    a = p.parse_args()
    args = ServerArgs.from_cli_args(a)
    path = resolve_model_path(args.model_path)
    # Only --ttft reads the outputs. Kept over a whole offline run, they were hundreds of thousands of objects by its
    # end, and full collections over them stalled the profiled loop for up to 61 ms (a scheduler process sends them
    # on).
    sent: list = []
    sched = Scheduler(args, path, load_model_config(path), None, lambda timeout_ms: [],
                      sent.append if a.ttft else (lambda msg: None))
    freeze_startup_objects()  # as a scheduler process does (scheduler/run.py)

    def requests(tag: str) -> list:
        g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))  # new prompts each run: no cache hits
        params = SamplingParams(max_new_tokens=a.output_len, temperature=0, ignore_eos=True)
        return [TokenizedGenerateReq(f"{tag}{i}", torch.randint(0, 10000, (a.input_len,), generator=g).tolist(),
                                     params, seed=i) for i in range(a.batch_size)]

    if a.offline:
        return profile_offline(sched, a)
    if a.ttft:
        return profile_ttft(sched, a, sent)

    def run(tag: str) -> float:
        sched.process_input_requests(requests(tag))
        steps = 0
        start = time.perf_counter()
        while not sched.is_idle():
            sched.run_step()
            steps += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3

    run("warm")
    print(f"loop iteration {run('timed'):.3f} ms (batch {a.batch_size}, overlap {sched.use_overlap}, "
          f"graphs {sched.runner.graph_runner is not None})")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(a.repeat):
        run(f"prof{i}-")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(a.top)
    print(out.getvalue()[-6000:])
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as kp:
            run("kernels")
        print(kp.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=60))


def gaps_between(timeline: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """The device time (ms) from each span's end to the next span's start (in start order; overlaps count 0), keyed
    by the two spans' labels: where the device runs neither a forward nor the sampling, or idles."""
    gaps: dict[str, list[float]] = defaultdict(list)
    ordered = sorted(timeline, key=lambda t: t[1])
    for (a, _, a_end), (b, b_start, _) in itertools.pairwise(ordered):
        gaps[f"{a} -> {b}"].append(max(0.0, b_start - a_end))
    return gaps


class HostClock:
    """The host's side of each scheduler iteration: the time of its phases (scheduling, launching, reading results)
    and the garbage collections that ran in it, so that a long stall between two device spans can be named."""

    PHASES = ("get_next_batch_to_run", "launch_batch", "process_batch_result")

    def __init__(self, sched: Scheduler):
        self.sched, self.saved = sched, {name: getattr(sched, name) for name in self.PHASES}
        self.iterations: list[tuple[int, float, dict[str, float]]] = []  # (step, ms, ms a phase)
        self.collections: list[tuple[int, float, int]] = []  # (generation, ms, step)
        self.current: dict[str, float] = {}
        self.gc_started, self.at = 0.0, 0
        for name, fn in self.saved.items():
            setattr(sched, name, self._timed(name, fn))
        gc.callbacks.append(self._on_gc)

    def _timed(self, name: str, fn):
        def call(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.current[name] = self.current.get(name, 0.0) + (time.perf_counter() - t) * 1e3
        return call

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            self.collections.append((info["generation"], (time.perf_counter() - self.gc_started) * 1e3, self.at))

    def step(self, index: int) -> None:
        self.current, self.at = {}, index
        t = time.perf_counter()
        self.sched.run_step()
        self.iterations.append((index, (time.perf_counter() - t) * 1e3, self.current))

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)
        for name, fn in self.saved.items():
            setattr(self.sched, name, fn)

    def report(self, top: int = 5) -> None:
        print(f"slowest scheduler iterations on the host (of {len(self.iterations)}): step, ms, ms a phase")
        for index, ms, phases in sorted(self.iterations, key=lambda it: -it[1])[:top]:
            print(f"  #{index:<5d} {ms:8.2f}  " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        print("garbage collections during the run: generation, count, total ms, largest ms (its step)")
        for gen in range(3):
            ms = [(t, at) for g, t, at in self.collections if g == gen]
            if ms:
                worst = max(ms)
                print(f"  {gen}: {len(ms):6d} {sum(t for t, _ in ms):9.2f} {worst[0]:8.2f} (#{worst[1]})")


def profile_offline(sched: Scheduler, a: argparse.Namespace) -> None:
    """Device time of each phase over the whole offline workload, from CUDA events around each call."""
    w = make_workload(256, (100, 1024), (100, 1024), sched.vocab_size, 0)
    # submit() reads `w`; the kernel tables below switch it to fresh prompts
    spans: list[tuple[str, int, object, object]] = []
    runner = sched.runner
    forward, sample = runner.forward, runner.sample

    def timed(kind, fn):
        def call(first, *rest, **kw):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(first, *rest, **kw)
            end.record()
            label = kind if kind == "sample" else f"forward {first.forward_mode.name.lower()}"
            spans.append((label, first.batch_size if kind != "sample" else first.shape[0], start, end))
            return out
        return call

    def submit(tag: str, n: int) -> None:
        reqs = [TokenizedGenerateReq(f"{tag}{i}", p, SamplingParams(max_new_tokens=o, temperature=0.6,
                                                                   ignore_eos=True), seed=i)
                for i, (p, o) in enumerate(zip(w.prompts[:n], w.output_lens[:n], strict=True))]
        sched.process_input_requests(reqs)

    submit("warm", 16)
    while not sched.is_idle():
        sched.run_step()
    runner.forward, runner.sample = timed("forward", forward), timed("sample", sample)
    host = HostClock(sched)
    submit("timed", len(w.prompts))
    steps, start = 0, time.perf_counter()
    while not sched.is_idle():
        host.step(steps)
        steps += 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    host.close()
    by_kind: dict[str, list[float]] = defaultdict(list)
    decode_by_bs: dict[int, list[float]] = defaultdict(list)
    for label, bs, s, e in spans:
        ms = s.elapsed_time(e)
        by_kind[label].append(ms)
        if label == "forward decode":
            decode_by_bs[(bs + 31) // 32 * 32].append(ms)
    print(f"offline workload: {w.output_tokens} output tokens, {steps} steps, wall {wall:.2f} s, "
          f"{w.output_tokens / wall:.0f} out tok/s")
    busy = sum(sum(v) for v in by_kind.values()) / 1e3
    print(f"device time in events: {busy:.2f} s ({100 * busy / wall:.0f}% of wall)")
    for label, v in sorted(by_kind.items()):
        print(f"  {label:16s} {len(v):6d} calls {sum(v) / 1e3:7.2f} s  mean {sum(v) / len(v):7.3f} ms")
    print("decode forward by batch size (rounded up to 32): calls, mean ms")
    for bs, v in sorted(decode_by_bs.items()):
        print(f"  <= {bs:4d}: {len(v):5d} {sum(v) / len(v):7.3f}")
    ref = spans[0][2]
    timeline = [(label, ref.elapsed_time(s), ref.elapsed_time(e)) for label, _, s, e in spans]
    print("device time outside the forwards and sampling, by the spans around it: count, total s, median / p90 / "
          "largest ms, and the largest one's index among them (its decode step for the busiest key)")
    for key, v in sorted(gaps_between(timeline).items(), key=lambda kv: -sum(kv[1])):
        ranked = sorted(v)
        print(f"  {key:36s} {len(v):6d} {sum(v) / 1e3:7.3f} {ranked[len(v) // 2]:7.3f} {ranked[9 * len(v) // 10]:7.3f}"
              f" {ranked[-1]:8.2f}  #{v.index(ranked[-1])}")
    runner.forward, runner.sample = forward, sample
    host.report()
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile

        w = make_workload(256, (100, 1024), (100, 1024), sched.vocab_size, 1)  # new prompts: no cache hits
        submit("kern", 256)
        for label, skip, n in (("the first prefill step", 0, 1), ("20 decode steps", 200, 20)):
            for _ in range(skip):
                sched.run_step()
            with profile(activities=[ProfilerActivity.CUDA]) as kp:
                for _ in range(n):
                    sched.run_step()
                torch.cuda.synchronize()
            print(f"{label}, {len(sched.running)} running:")
            print(kp.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70))


def profile_ttft(sched: Scheduler, a: argparse.Namespace, sent: list) -> None:
    """The scheduler's share of TTFT (no HTTP, ZMQ or detokenizer): from handing it a request to sending
    that request's first token, with batch-size - 1 other requests decoding, like bench serving's
    --max-concurrency. Also the plain cost of one prefill forward of input-len tokens."""
    g = torch.Generator().manual_seed(0)

    def req(rid: str, n_out: int) -> TokenizedGenerateReq:
        ids = torch.randint(0, 10000, (a.input_len,), generator=g).tolist()
        return TokenizedGenerateReq(rid, ids, SamplingParams(max_new_tokens=n_out, temperature=0, ignore_eos=True), 0)

    def first_token_sent(rid: str) -> bool:
        return any(rid in out.rids for out in sent if hasattr(out, "rids"))

    sched.process_input_requests([req(f"bg{i}", sched.runner.context_len - a.input_len)
                                  for i in range(a.batch_size - 1)])
    for _ in range(20):
        sched.run_step()
    ttfts, steps = [], []
    for k in range(30):
        sent.clear()
        rid = f"new{k}"
        start = time.perf_counter()
        sched.process_input_requests([req(rid, 4)])
        n = 0
        while not first_token_sent(rid):
            sched.run_step()
            n += 1
        ttfts.append((time.perf_counter() - start) * 1e3)
        steps.append(n)
        for _ in range(5):
            sched.run_step()
    ttfts.sort()
    print(f"scheduler TTFT, {a.batch_size - 1} decoding + 1 new of {a.input_len} tokens: median "
          f"{ttfts[len(ttfts) // 2]:.1f} ms, min {ttfts[0]:.1f}, max {ttfts[-1]:.1f} (loop steps: {sorted(steps)})")


if __name__ == "__main__":
    main()
