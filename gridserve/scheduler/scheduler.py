"""The scheduler of one rank: admits requests, forms batches, runs the model, checks stop conditions and
sends new tokens out. Its IO is callables (recv, send, report_load) that run_scheduler_process wires to ZMQ, so
the class itself knows nothing of sockets (scripts/profile_scheduler.py drives it in-process)."""

import gc
import logging
import time
from collections.abc import Callable

import torch

from gridserve.forward_batch import ForwardBatch, ForwardMode
from gridserve.messages import (
    CONTEXT_TOKENS,
    AbortReq,
    BatchTokenIDOutput,
    DetokInit,
    FlushCacheReq,
    GetInternalStateReq,
    ReqOutputs,
    RpcOutput,
    SchedulerStats,
    TokenizedGenerateReq,
)
from gridserve.model_executor.model_runner import ModelRunner
from gridserve.models.config import ModelConfig
from gridserve.sampling.sampler import SampleOutput
from gridserve.scheduler.kv_manager import KVManager
from gridserve.scheduler.launch_clock import LaunchClock
from gridserve.scheduler.schedule_batch import Req, ScheduleBatch
from gridserve.scheduler.schedule_policy import (
    PrefillAdder,
    admit,
    order_waiting,
    preemption_victim,
)
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

INIT_NEW_TOKEN_RATIO, MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY = 0.7, 0.1, 0.001
DECODE_LOG_INTERVAL = 40  # decode steps between two throughput log lines (SGLang's default)
DECODE_IDLE_GAP_S = 1.0  # a pause between decode steps longer than this is idle time, not decoding
LOAD_REPORT_INTERVAL_S = 0.05  # a busy replica's token count drifts with every step: report it this often

ARRIVED_IN_WAIT_S = 0.0001  # recv returned after this long: the request came while it waited, not before
IDLE_POLL_MS = 50  # how long an idle scheduler waits for a request before checking on its parent again

# recv(timeout_ms) returns the messages that arrived, waiting up to timeout_ms for the first (0: none waited for);
# send(msg) emits a BatchTokenIDOutput or an RpcOutput towards the detokenizer.
RecvFn = Callable[[int], list]
SendFn = Callable[[object], None]


class Scheduler:
    def __init__(self, args: ServerArgs, model_path: str, cfg: ModelConfig, tokenizer, recv: RecvFn, send: SendFn,
                 gpu_id: int = 0, dp_rank: int = 0, report_load: SendFn | None = None):
        self.args = args
        self.recv, self.send = recv, send
        self.dp_rank = dp_rank
        self.report_load = report_load  # to the DP controller (the IO rank of a replica, dp > 1), else None
        self.num_received = 0
        self.last_report: tuple = (0.0, None)  # (time, what changed) of the latest load report
        self.tokenizer = tokenizer
        self.runner = ModelRunner(args, model_path, cfg, gpu_id)
        self.kv = KVManager(self.runner.req_to_token_pool, self.runner.allocator, not args.disable_radix_cache)
        self.eos_ids = set(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.vocab_size = cfg.vocab_size
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        # how much room admission keeps for the future tokens of running requests (SGLang's conservativeness)
        self.min_new_token_ratio = min(1.0, MIN_NEW_TOKEN_RATIO * args.schedule_conservativeness)
        self.new_token_ratio = min(1.0, INIT_NEW_TOKEN_RATIO * args.schedule_conservativeness)
        self.num_retracted = 0
        self.num_queue_full = 0  # requests refused because the waiting queue was full
        self.num_preempted = 0  # running requests that gave their place to a higher-priority one
        self.prefill_batches_total = 0
        # +1: larger priority values first, -1: smaller first, 0: priorities are ignored
        self.priority_sign = (-1 if args.schedule_low_priority_values_first else 1) \
            if args.enable_priority_scheduling else 0
        self.prompt_tokens_total = 0
        self.cached_prompt_tokens_total = 0
        self.stopped = False
        self.last_batch: ScheduleBatch | None = None  # launched, results not read yet (overlap loop)
        self.last_tokens = None  # the device tensor of the latest launched batch's sampled ids
        on_cuda = self.runner.device.type == "cuda"
        self.use_overlap = not args.disable_overlap_schedule and (on_cuda or args.enable_overlap_schedule)
        self.launch_clock = LaunchClock(not args.disable_late_launch and self.use_overlap and self.runner.pp.size == 1)
        self.turn_started = time.perf_counter()  # when this loop turn's wait for requests ended
        self.prefill_budget = args.prefill_token_budget
        self.pp_loop = None
        self.micro_batch_cap = self.runner.max_running_requests
        if self.runner.pp.size > 1:
            from gridserve.scheduler.pp_loop import PipelineLoop

            self.pp_loop = PipelineLoop(self)
            self.micro_batch_cap = args.pp_max_micro_batch_size or max(
                1, self.runner.max_running_requests // self.runner.pp.size)
        self.decode_steps = 0
        self.progress = None  # a shared counter the launcher's watchdog reads (--watchdog-timeout), when set
        # (time, tokens decoded) since the decode log window began; the window restarts after an idle gap
        self.decode_log_start = (time.perf_counter(), 0)
        self.last_decode_time = 0.0
        self.gen_throughput = 0.0
        self.queue_times: list[float] = []  # of requests admitted since the last output was sent

    @property
    def scheduler_info(self) -> dict:
        r = self.runner
        return {"status": "ready", "max_total_num_tokens": r.max_total_num_tokens,
                "max_running_requests": r.max_running_requests, "context_len": r.context_len,
                "max_req_input_len": min(r.context_len, r.max_total_num_tokens) - 1}

    # ---- event loops ----------------------------------------------------------------------------
    def event_loop(self) -> None:
        if self.pp_loop is not None:
            return self.pp_loop.run()
        while not self.stopped:
            msgs = self.receive()
            self.process_input_requests(msgs)
            self.run_step()
            self.end_iteration()

    def receive(self) -> list:
        """This turn's messages, waited for as recv_wait_ms says; the launch clock hears when new requests came."""
        wait_ms, asked = self.recv_wait_ms(), time.perf_counter()
        msgs = self.recv(wait_ms)
        self.turn_started = time.perf_counter()
        if self.launch_clock.enabled and self.last_batch is not None:
            in_wait = wait_ms > 0 and self.turn_started - asked > ARRIVED_IN_WAIT_S
            new = sum(isinstance(m, TokenizedGenerateReq) for m in msgs)
            self.launch_clock.arrived(new, in_wait, self.turn_started)
        return msgs

    def recv_wait_ms(self) -> int:
        """How long this turn waits for new requests: IDLE_POLL_MS when idle; with a decode step in flight and late
        launch on, until just before that step should end (launch_clock.py); else not at all."""
        if self.is_idle():
            return IDLE_POLL_MS
        b = self.last_batch
        if b is None:
            return 0
        return int(self.launch_clock.wait_s(b.mode.is_decode(), len(b.reqs), time.perf_counter()) * 1000)

    def end_iteration(self) -> None:
        """The bookkeeping every event loop does once per iteration: the load report to the DP controller, and one
        more tick for the launcher's watchdog (a rank whose count stands still for --watchdog-timeout is hung;
        an idle loop still turns every IDLE_POLL_MS)."""
        self.maybe_report_load()
        if self.progress is not None:
            self.progress.value += 1

    def run_step(self) -> None:
        """Schedules and launches the next batch, then reads the results of one launched batch.

        Normal loop: it reads the batch it just launched, so the host waits for every step. Overlap loop: it
        reads the batch launched before, so the device runs step i while the host reads step i-1's tokens and
        schedules step i+1. A request that step i-1 finishes may still be in step i; that token is dropped.
        """
        batch = self.get_next_batch_to_run()
        if batch is not None:
            self.launch_batch(batch)
            self.launch_clock.launched(time.perf_counter() - self.turn_started, batch.mode.is_decode())
        if self.use_overlap:
            batch, self.last_batch = self.last_batch, batch
        if batch is not None:
            self.process_batch_result(batch)

    def is_idle(self) -> bool:
        return not (self.waiting or self.running or self.chunked_req or self.last_batch)

    # ---- inputs ---------------------------------------------------------------------------------
    def process_input_requests(self, msgs: list) -> None:
        for msg in msgs:
            if isinstance(msg, TokenizedGenerateReq):
                self.add_request(msg)
            elif isinstance(msg, AbortReq):
                self.abort_request(msg.rid)
            elif isinstance(msg, FlushCacheReq):
                self.send(RpcOutput(msg.rid, self.flush_cache(), dp_rank=self.dp_rank))
            elif isinstance(msg, GetInternalStateReq):
                self.send(RpcOutput(msg.rid, True, self.get_internal_state(), self.dp_rank))
            else:
                logger.error("scheduler got an unknown message %r", type(msg).__name__)

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        self.num_received += 1
        req = Req(msg.rid, list(msg.input_ids), msg.sampling_params, msg.seed, msg.return_logprob,
                  msg.top_logprobs_num)
        req.priority = msg.priority or 0
        error = self._validate(req)
        if error:
            req.finished_reason = {"type": "abort", "message": error}
            self._send([req])
            return
        limit = self.args.max_queued_requests
        if limit is not None and len(self.waiting) >= limit:  # refused at once: nothing queued, nothing held
            self.num_queue_full += 1
            req.finished_reason = {"type": "abort", "status_code": 503, "message": f"the waiting queue is full "
                                   f"({limit} requests, --max-queued-requests); retry shortly"}
            self._send([req])
            return
        self.waiting.append(req)

    def _validate(self, req: Req) -> str | None:
        n, max_new = len(req.origin_input_ids), req.params.max_new_tokens
        if n == 0:
            return "the prompt is empty"
        if n + max_new > self.runner.context_len:
            return (f"prompt ({n} tokens) + max_new_tokens ({max_new}) exceeds the context length "
                    f"({self.runner.context_len})")
        if n + max_new > self.runner.max_total_num_tokens:
            return (f"prompt ({n} tokens) + max_new_tokens ({max_new}) exceeds the whole KV cache "
                    f"({self.runner.max_total_num_tokens} tokens); raise --max-total-tokens")
        if any(t < 0 or t >= self.vocab_size for t in req.origin_input_ids):
            return f"input_ids must be in [0, {self.vocab_size})"
        return None

    def abort_request(self, rid: str) -> None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                req.finished_reason = {"type": "abort", "message": "aborted"}
                self._send([req])
                return
        in_flight = self.running + ([self.chunked_req] if self.chunked_req else [])
        for req in in_flight:
            if req.rid == rid:  # aborts arrive between steps, so its KV can go back at once
                req.finished_reason = {"type": "abort", "message": "aborted"}
                self.kv.release(req)
                self.running = [r for r in self.running if r is not req]
                if req is self.chunked_req:
                    self.chunked_req = None
                self._send([req])
                return

    def stats(self, with_tokens: bool = False) -> SchedulerStats:
        """with_tokens: also count tokens_in_flight (a pass over every request, so not on every step)."""
        kv = self.kv
        cached = kv.tree.total_size() if kv.tree else 0
        total = self.runner.max_total_num_tokens
        return SchedulerStats(
            dp_rank=self.dp_rank, num_received=self.num_received,
            num_running=len(self.running) + (self.chunked_req is not None), num_waiting=len(self.waiting),
            max_total_num_tokens=total, used_tokens=total - kv.allocator.available_size() - cached,
            cached_tokens=cached, num_retracted=self.num_retracted, num_evicted_tokens=kv.num_evicted_tokens,
            prompt_tokens_total=self.prompt_tokens_total, cached_prompt_tokens_total=self.cached_prompt_tokens_total,
            gen_throughput=self.gen_throughput, num_queue_full=self.num_queue_full,
            tokens_in_flight=sum(r.num_tokens for r in self.in_flight()) if with_tokens else 0)

    def in_flight(self) -> list[Req]:
        """Every request this replica holds: running, waiting, and the one being prefilled in chunks."""
        return self.running + self.waiting + ([self.chunked_req] if self.chunked_req else [])

    def maybe_report_load(self) -> None:
        """Tells the DP controller this replica's load when its requests changed (taken in, admitted, finished),
        and every LOAD_REPORT_INTERVAL_S while tokens are being generated. A no-op without a controller."""
        if self.report_load is None:
            return
        now = time.monotonic()
        key = (self.num_received, len(self.running), len(self.waiting), self.chunked_req is not None)
        last_time, last_key = self.last_report
        if key == last_key and (self.is_idle() or now - last_time < LOAD_REPORT_INTERVAL_S):
            return
        self.last_report = (now, key)
        self.report_load(self.stats(with_tokens=True))

    def get_internal_state(self) -> dict:
        s = self.stats(with_tokens=True)
        del s.queue_times  # the histogram's samples, not a state
        state = {**vars(s), "token_usage": s.token_usage, "cache_hit_rate": s.cache_hit_rate,
                 "new_token_ratio": self.new_token_ratio, "available_tokens": self.kv.allocator.available_size(),
                 "free_req_slots": self.kv.req_pool.available_size(), "num_preempted": self.num_preempted,
                 "prefill_batches_total": self.prefill_batches_total, "gc_frozen_objects": gc.get_freeze_count()}
        if self.launch_clock.enabled:
            state["late_launch"] = self.launch_clock.state()
        if self.pp_loop is not None:  # stage 0's view (the IO rank answers)
            state.update(pp_micro_batches=self.pp_loop.micro_batches, pp_max_in_flight=self.pp_loop.max_in_flight,
                         pp_micro_batch_cap=self.micro_batch_cap, pp_busy_s=self.runner.busy.busy_s(),
                         pp_active_s=self.pp_loop.active_s, pp_idle_fraction=self.pp_loop.idle_fraction())
        return state

    def flush_cache(self) -> bool:
        if not self.is_idle():
            logger.warning("flush_cache ignored: requests are in flight")
            return False
        self.kv.flush()
        return True

    # ---- batching -------------------------------------------------------------------------------
    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        batch = self.get_new_prefill_batch()
        if batch is not None:
            return batch
        self.retract_until_decode_fits()
        reqs = self.decodable()
        if not reqs:
            return None
        self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        for r in reqs:
            r.extend_len = 1
        self._log_decode(len(reqs))
        return ScheduleBatch(reqs, ForwardMode.DECODE)

    def decodable(self) -> list[Req]:
        """Running requests that need another token. One step ahead (overlap), a request may already hold
        its last token unread; it finishes by length when that step is read, so it is not run again."""
        reqs = [r for r in self.running if r.num_generated < r.params.max_new_tokens]
        if self.pp_loop is not None:
            # A micro-batch in flight holds its requests until their tokens come back; an even share of the
            # running requests per micro-batch keeps every stage busy.
            share = -(-len(reqs) // self.runner.pp.size)
            reqs = [r for r in reqs if not r.pending][: min(self.micro_batch_cap, share)]
        return reqs

    def get_new_prefill_batch(self) -> ScheduleBatch | None:
        if not self.waiting and self.chunked_req is None:
            return None
        adder = PrefillAdder(self.kv, self.running, self.prefill_budget, self.runner.max_running_requests,
                             self.new_token_ratio, max_batch=self.micro_batch_cap)
        if self.chunked_req is not None:
            need = min(len(self.chunked_req.fill_ids) - self.chunked_req.kv_len, self.prefill_budget)
            self.retract(lambda: self.kv.available() >= need, keep=0)
            adder.add_chunked(self.chunked_req)
        ordered = order_waiting(self.waiting, self.args.schedule_policy, self.kv, self.priority_sign)
        if self.priority_sign and self._preempt_for(ordered, adder):
            ordered = order_waiting(self.waiting, self.args.schedule_policy, self.kv, self.priority_sign)
        admitted = admit(adder, ordered)
        if admitted:
            taken = set(map(id, admitted))
            self.waiting = [r for r in self.waiting if id(r) not in taken]
        for req in admitted:
            if not req.admitted:
                req.admitted, req.cached_tokens = True, req.kv_len
                self.queue_times.append(time.perf_counter() - req.arrival_time)
                self.prompt_tokens_total += len(req.origin_input_ids)
                self.cached_prompt_tokens_total += req.kv_len
        self.chunked_req = adder.new_chunked
        if not adder.batch:
            return None
        self._log_prefill(adder.batch)
        self.prefill_batches_total += 1
        return ScheduleBatch(adder.batch, ForwardMode.EXTEND)

    def _preempt_for(self, ordered: list[Req], adder: PrefillAdder) -> bool:
        """While the first waiting request cannot be admitted for want of a slot or of KV memory, it takes the
        place of a running request it beats by more than --priority-scheduling-preemption-threshold: that one goes
        back to the queue (its KV to the prefix cache) and is recomputed later, its output unchanged."""
        first = next((r for r in ordered if not r.pending), None)
        if first is None or adder.budget <= 0 or adder.new_chunked is not None:  # not for preemption to fix
            return False
        preempted = False
        while not adder.fits(first):
            victim = preemption_victim(first, self.running, self.priority_sign,
                                       self.args.priority_scheduling_preemption_threshold)
            if victim is None:
                break
            self.running.remove(victim)
            self.kv.release(victim)
            self.waiting.insert(0, victim)  # first among its priority: it arrived before the ones still waiting
            victim.preemptions += 1
            self.num_preempted += 1
            adder.set_running(self.running)
            logger.info("preempted request %s (priority %d) for %s (priority %d)", victim.rid, victim.priority,
                        first.rid, first.priority)
            preempted = True
        return preempted

    def _log_prefill(self, reqs: list[Req]) -> None:
        s = self.stats()
        logger.info("prefill batch: %d requests, %d new tokens, %d cached tokens, token usage %.2f, running %d, "
                    "waiting %d", len(reqs), sum(r.extend_len for r in reqs), sum(r.kv_len for r in reqs),
                    s.token_usage, len(self.running), len(self.waiting))

    def _log_decode(self, batch_size: int) -> None:
        """Every DECODE_LOG_INTERVAL steps, logs (and sets the gen_throughput gauge to) the tokens decoded per
        second since the last line. Time spent idle is not decoding: a step after a gap starts a new window."""
        now = time.perf_counter()
        self.decode_steps += 1
        t0, n0 = self.decode_log_start
        if now - self.last_decode_time > DECODE_IDLE_GAP_S:
            t0, n0 = now, -batch_size  # this step's tokens were computed before `now`: they open the window
        self.last_decode_time = now
        tokens = n0 + batch_size
        if self.decode_steps % DECODE_LOG_INTERVAL:
            self.decode_log_start = (t0, tokens)
            return
        self.gen_throughput = tokens / max(now - t0, 1e-9)
        idle = "" if self.pp_loop is None else f", stage idle {self.pp_loop.idle_fraction():.1%}"
        logger.info("decode batch: %d running, token usage %.2f, gen throughput %.1f tok/s%s", batch_size,
                    self.stats().token_usage, self.gen_throughput, idle)
        self.decode_log_start = (now, 0)

    def retract_until_decode_fits(self) -> None:
        """Each decoding request needs one new slot; retract the newest requests until they all fit."""
        self.retract(lambda: self.kv.available() >= len(self.decodable()), keep=1)

    def retract(self, fits: Callable[[], bool], keep: int) -> None:
        """Moves the newest running requests back to the waiting queue (their KV is released and will be
        recomputed) until fits() holds or only `keep` remain."""
        while len(self.running) > keep and not fits():
            victim = self.running.pop()
            self.kv.release(victim)
            self.waiting.insert(0, victim)
            self.num_retracted += 1
            self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
            logger.info("retracted request %s (KV cache full); it will be recomputed", victim.rid)

    # ---- running --------------------------------------------------------------------------------
    def launch_batch(self, batch: ScheduleBatch) -> None:
        """Queues the batch's forward and sampling on the device and advances its requests. Nothing here waits
        for the device."""
        prev = self.last_tokens
        logits = self.runner.forward(self.prepare_forward(batch, prev))
        result = self.sample(batch, logits, prev)
        batch.result = result.copy_to_host()
        self.last_tokens = result.next_token_ids
        self.advance(batch)

    def prepare_forward(self, batch: ScheduleBatch, prev: torch.Tensor | None) -> ForwardBatch:
        """Allocates the batch's KV slots and builds its model inputs (prev: the previous batch's sampled ids,
        on the device, for requests whose newest token the host has not read yet)."""
        runner = self.runner
        out_cache_loc = self.kv.alloc(sum(r.extend_len for r in batch.reqs))
        return batch.to_forward_batch(runner.req_to_token_pool.req_to_token, out_cache_loc, runner.device, prev)

    def sample(self, batch: ScheduleBatch, logits: torch.Tensor, prev: torch.Tensor | None) -> SampleOutput:
        want_logprob = any(r.return_logprob for r in batch.reqs)
        top_k = max(r.top_logprobs_num for r in batch.reqs)
        info = batch.sampling_info(self.vocab_size, self.runner.device, prev)
        return self.runner.sample(logits, info, want_logprob, top_k)

    def advance(self, batch: ScheduleBatch) -> None:
        """Moves the requests on as if the launched batch had run: KV lengths grow, sampling requests hold one
        more pending token, new requests join the running set."""
        for i, req in enumerate(batch.reqs):
            req.kv_len += req.extend_len
            samples = req.kv_len == req.num_tokens
            batch.samples.append(samples)
            if batch.mode.is_extend() and (not samples or req.num_generated + 1 < req.params.max_new_tokens):
                # Publish the prompt (or the chunk so far) to the prefix cache now, not when the request finishes:
                # requests sharing it that arrive while this one decodes reuse it. Stream order makes any batch
                # that reads these slots run after the forward that writes them. (One that ends with this step's
                # token is published as it is released.)
                self.kv.cache_unfinished(req)
            if not samples:
                continue
            req.pending += 1
            req.last_row = i
            if batch.mode.is_extend() and req is not self.chunked_req:
                self.running.append(req)

    def process_batch_result(self, batch: ScheduleBatch) -> None:
        """Reads a launched batch's tokens (waiting for the device if needed), checks stop conditions, frees
        finished requests and sends the new tokens on."""
        started = time.perf_counter()
        next_ids, logprobs, top_val, top_idx = batch.result.wait()
        now = time.perf_counter()
        self.launch_clock.synced(batch.mode.is_decode(), len(batch.reqs), now - started, now)
        done = []
        for i, req in enumerate(batch.reqs):
            if not batch.samples[i]:
                continue
            req.pending -= 1
            if req.finished:  # aborted, or finished by the previous step while this one ran
                continue
            if req.params.max_new_tokens == 0:
                req.finished_reason = {"type": "length", "length": 0}
                done.append(req)
                continue
            req.output_ids.append(next_ids[i])
            if req.return_logprob:
                req.logprobs.append(logprobs[i])
            if req.top_logprobs_num:
                k = req.top_logprobs_num
                req.top_logprobs.append(list(zip(top_val[i][:k], top_idx[i][:k], strict=True)))
            self.check_finished(req)
            if req.finished:
                done.append(req)
        for req in done:
            if req in self.waiting:  # retracted while its last token was on the device
                self.waiting.remove(req)
            self.kv.release(req)
        if done:  # before the send: the stats it carries must not count finished requests as running
            self.running = [r for r in self.running if not r.finished]
            # and the DP controller hears of the freed room before the client can send its next request
            self.maybe_report_load()
        self._send(batch.reqs)

    def check_finished(self, req: Req) -> None:
        p, tok = req.params, req.output_ids[-1]
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            req.finished_reason = {"type": "stop", "matched": tok}
        elif len(req.output_ids) >= p.max_new_tokens:
            req.finished_reason = {"type": "length", "length": p.max_new_tokens}
        elif p.stop and self.tokenizer is not None:
            # the longest stop string spans at most that many tokens (plus a margin for merged pieces)
            window = max(len(s) for s in p.stop) + 4
            tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=p.skip_special_tokens)
            for s in p.stop:
                if s in tail:
                    req.finished_reason = {"type": "stop", "matched": s}
                    break

    def _send(self, reqs: list[Req]) -> None:
        out = BatchTokenIDOutput(ReqOutputs())
        o = out.reqs
        for r in reqs:
            if r.finish_sent or (r.sent_len == len(r.output_ids) and not r.finished):
                continue
            o.rids.append(r.rid)
            o.new_token_ids.append(r.output_ids[r.sent_len :])
            o.new_token_logprobs.append(r.logprobs[r.sent_len :])
            o.new_top_logprobs.append(r.top_logprobs[r.sent_len :])
            o.finished_reasons.append(r.finished_reason)
            o.prompt_tokens.append(len(r.origin_input_ids))
            o.completion_tokens.append(len(r.output_ids))
            o.cached_tokens.append(r.cached_tokens)
            first = not r.detok_started
            out.detok_init.append(DetokInit(r.origin_input_ids[-CONTEXT_TOKENS:], r.params.stop,
                                            r.params.skip_special_tokens) if first else None)
            r.detok_started = True
            r.sent_len = len(r.output_ids)
            r.finish_sent = r.finished
        if o.rids:
            out.stats = self.stats()
            out.stats.queue_times, self.queue_times = self.queue_times, []
            self.send(out)
