"""TokenizerManager: the front end's view of requests. Tokenizes and validates, sends TokenizedGenerateReq
to the scheduler, and turns the detokenizer's outputs back into per-request results and streams.

Outputs arrive on the deployment's ZMQ receiver thread.
That thread only appends each step to its request's deque and wakes the request's event loop once per batch;
the request's own coroutine folds the steps it finds into its cumulative result. A consumer that falls
behind therefore gets several steps in one result instead of a backlog, and the receiving thread's cost per
token stays constant (at batch 256 building every result there cost more than a GPU step). Each request
remembers its own event loop, so any number of loops (uvicorn's, the gRPC server's, the offline Engine's)
can wait on requests at once."""

import asyncio
import logging
import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from gridserve.errors import InvalidParamError, RequestTooLargeError
from gridserve.messages import (
    AbortReq,
    BatchStrOutput,
    FlushCacheReq,
    GetInternalStateReq,
    ReqOutputs,
    RpcOutput,
    TokenizedGenerateReq,
)
from gridserve.metrics import Metrics
from gridserve.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


OUTBOX_SIZE = 100_000  # messages queued for the schedulers before new requests get 503
# Prompt tokens a message may carry and still be encoded on the thread that posts it, an event loop: ~0.3 ms of
# encoding on a CPU of this project's CI. A larger one goes through the sender thread (2.7 ms at 128k tokens).
DIRECT_SEND_MAX_TOKENS = 16_384
_BUSY = f"{OUTBOX_SIZE} messages are waiting for the schedulers; retry shortly"


class SchedulerDeadError(RuntimeError):
    """A scheduler (or the detokenizer) is gone; the deployment is going down."""


class ServerBusyError(RuntimeError):
    """The schedulers' inbound queue is full."""


class StepOut(NamedTuple):
    """One request's share of one detokenized step: entry i of the step's per-request fields."""

    delta: str
    reqs: ReqOutputs
    i: int
    time: float


@dataclass
class ReqState:
    loop: asyncio.AbstractEventLoop
    prompt_tokens: int
    event: asyncio.Event = field(default_factory=asyncio.Event)
    steps: deque = field(default_factory=deque)  # StepOut, appended by the receiving thread
    woken: bool = False  # a wake-up is scheduled and the consumer has not yet taken it
    finished: bool = False  # set by the receiving thread when the last step arrives
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None
    # The cumulative result, kept by the request's coroutine.
    text: str = ""
    yielded_chars: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    last: StepOut | None = None

    @property
    def finish_reason(self) -> dict | None:
        return None if self.last is None else self.last.reqs.finished_reasons[self.last.i]

    def take_steps(self) -> bool:
        """Folds the steps that arrived into the result; False when there were none."""
        got = False
        while self.steps:
            step = self.steps.popleft()  # deque ops are atomic: safe against the appending thread
            got = True
            reqs, i = step.reqs, step.i
            new_ids = reqs.new_token_ids[i]
            self.text += step.delta
            self.output_ids += new_ids
            self.logprobs += list(zip(reqs.new_token_logprobs[i], new_ids, strict=False))
            self.top_logprobs += reqs.new_top_logprobs[i]
            self.last = step
        return got

    def ttft(self) -> float | None:
        return self.first_token_time - self.created if self.first_token_time else None

    def result(self, rid: str) -> dict:
        """The cumulative result; "delta" is the text since the previous result."""
        last = self.last
        reqs, i = last.reqs, last.i
        delta, self.yielded_chars = self.text[self.yielded_chars :], len(self.text)
        return {
            "text": self.text,
            "delta": delta,
            "output_ids": list(self.output_ids),
            "meta_info": {
                "id": rid,
                "prompt_tokens": reqs.prompt_tokens[i],
                "completion_tokens": reqs.completion_tokens[i],
                "cached_tokens": reqs.cached_tokens[i],
                "finish_reason": reqs.finished_reasons[i],
                "output_token_logprobs": list(self.logprobs),
                "output_top_logprobs": list(self.top_logprobs),
                "ttft": self.ttft(),
                "e2e_latency": last.time - self.created,
            },
        }


def _prompt_tokens(msg: object) -> int:
    return sum(len(m.input_ids) for m in (msg if isinstance(msg, list) else [msg])
               if isinstance(m, TokenizedGenerateReq))


def _set_events(states: list[ReqState]) -> None:
    for state in states:
        state.event.set()


class TokenizerManager:
    def __init__(self, tokenizer, scheduler_info: dict, vocab_size: int, send: Callable[[object], None],
                 served_model_name: str = "default", random_seed: int = 0, dp_size: int = 1,
                 abort_on_priority: bool = False, send_now: Callable[[object], bool] | None = None):
        """send: sends a message to the schedulers, blocking while they cannot take it. send_now: the same on the
        same socket without blocking, False if it would have blocked. abort_on_priority: refuse requests that set
        `priority` (priority scheduling off, and the server asked to say so rather than ignore it)."""
        self.tokenizer = tokenizer
        self.abort_on_priority = abort_on_priority
        self.info = scheduler_info
        self.vocab_size = vocab_size
        self.dp_size = dp_size
        # To the DP controller, or with dp = 1 to the replica's IO rank. A message leaves at once from the thread
        # that posts it (send_now) when nothing posted before it is still on its way and the socket takes it without
        # blocking; else it joins a queue that a sender thread drains, so no event loop ever waits on the socket.
        # The thread hop cost ~0.5 ms of every request's TTFT: the sender waited for the GIL until the event loop's
        # turn ended. ZMQ sockets are not thread-safe: _socket_lock makes their use one thread at a time. The
        # outbox's unfinished_tasks counts the messages queued or in the sender thread's hands (task_done once sent).
        self._outbox: queue.Queue = queue.Queue(OUTBOX_SIZE)
        self._send_now = send_now
        self._socket_lock = threading.Lock()
        threading.Thread(target=self._sender, args=(send,), name="gridserve-tm-send", daemon=True).start()
        # Requests started in one turn of an event loop leave together, as one message (see _send_soon).
        self._pending: list[TokenizedGenerateReq] = []
        self._pending_lock = threading.Lock()
        self.served_model_name = served_model_name
        self.rid_to_state: dict[str, ReqState] = {}
        self.rpc_waiters: dict[str, _RpcWaiter] = {}
        self.seed_rng = random.Random(random_seed)  # seeds for requests that give none
        self.metrics = Metrics(served_model_name, dp_size)
        self.dead_reason: str | None = None

    def send(self, msg: object) -> None:
        """Queues a message for the schedulers; never blocks (a full queue is a 503 for the request)."""
        try:
            self._post(msg)
        except queue.Full:
            raise ServerBusyError(_BUSY) from None

    def _post(self, msg: object) -> None:
        """Sends msg now if it can keep its place in line without blocking and is small enough to encode here, else
        queues it (raises queue.Full)."""
        if (self._send_now is not None and _prompt_tokens(msg) <= DIRECT_SEND_MAX_TOKENS
                and self._socket_lock.acquire(blocking=False)):
            try:
                if self._outbox.unfinished_tasks == 0 and self._send_now(msg):
                    return
            except Exception:  # noqa: BLE001 - the sender thread meets the error again and fails the requests
                pass
            finally:
                self._socket_lock.release()
        self._outbox.put_nowait(msg)

    def _send_soon(self, req: TokenizedGenerateReq) -> None:
        """Queues a request to leave with every other one started in this turn of the event loop, as one message (a
        list, which the receiving Channel unpacks): a batch (the Engine's, a prompt list, n > 1, a burst of
        clients) reaches the scheduler whole, so its first step sees all of it."""
        if self._outbox.full():
            raise ServerBusyError(_BUSY)
        with self._pending_lock:
            self._pending.append(req)
            first = len(self._pending) == 1
        if first:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Sends the requests queued in this turn of the event loop as one message. It runs when the turn ends; a
        route that has submitted all of its requests calls it at once."""
        with self._pending_lock:
            reqs, self._pending = self._pending, []
        if not reqs:
            return
        try:
            self._post(reqs if len(reqs) > 1 else reqs[0])
        except queue.Full:
            for req in reqs:
                self._fail_request(req.rid, _BUSY)

    def _take_back(self, req: TokenizedGenerateReq) -> bool:
        """Removes a request that has not left yet; True if it had not."""
        with self._pending_lock:
            for i, r in enumerate(self._pending):
                if r is req:
                    del self._pending[i]
                    return True
        return False

    def _sender(self, send: Callable[[object], None]) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                with self._socket_lock:
                    try:
                        send(msg)
                    finally:
                        self._outbox.task_done()
            except Exception as e:  # a closed socket at shutdown, or a message that cannot be encoded
                logger.exception("sending %s to the schedulers failed", type(msg).__name__)
                for m in msg if isinstance(msg, list) else [msg]:
                    if isinstance(m, TokenizedGenerateReq):  # its caller waits for outputs that will never come
                        self._fail_request(m.rid, f"the request could not be sent to the scheduler: {e!r}"[:300])

    def close(self) -> None:
        """Stops the sender thread (after what is queued)."""
        self._outbox.put(None)

    # ---- inputs ---------------------------------------------------------------------------------
    def tokenize(self, prompt: str | None, input_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (input_ids is None):
            raise InvalidParamError("prompt", "give exactly one of prompt or input_ids")
        if input_ids is None:
            if not isinstance(prompt, str):
                raise InvalidParamError("prompt", f"must be a string, got {type(prompt).__name__}")
            input_ids = self.tokenizer.encode(prompt)
        if not isinstance(input_ids, list) or not all(type(t) is int for t in input_ids):
            raise InvalidParamError("input_ids", "must be a list of ints")
        if not input_ids:
            raise InvalidParamError("prompt", "the prompt is empty")
        bad = [t for t in input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidParamError("input_ids", f"token ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return input_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidParamError("messages", "must be a non-empty list")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template error is the caller's malformed conversation
            raise InvalidParamError("messages", f"chat template failed: {e}") from e

    def validate_length(self, n_prompt: int, params: SamplingParams) -> None:
        ctx, pool = self.info["context_len"], self.info["max_total_num_tokens"]
        total = n_prompt + params.max_new_tokens
        for limit, what in ((ctx, "the context length"), (pool, "the KV cache size")):
            if total > limit:
                raise RequestTooLargeError("max_new_tokens", f"prompt ({n_prompt} tokens) + max_new_tokens "
                                           f"({params.max_new_tokens}) = {total} exceeds {what} ({limit} tokens)")

    def validate_dp_rank(self, routed_dp_rank: int | None) -> None:
        if routed_dp_rank is None:
            return
        if type(routed_dp_rank) is not int or not 0 <= routed_dp_rank < self.dp_size:
            raise InvalidParamError("routed_dp_rank", f"must be an int in [0, {self.dp_size}) (the server runs "
                                    f"{self.dp_size} data-parallel replicas), got {routed_dp_rank!r}")

    def validate_priority(self, priority: int | None) -> None:
        if priority is None:
            return
        if type(priority) is not int or not -2**63 <= priority < 2**63:
            raise InvalidParamError("priority", f"must be a 64-bit int, got {priority!r}")
        if self.abort_on_priority:
            raise InvalidParamError("priority", "priority scheduling is off on this server (it was started with "
                                    "--abort-on-priority-when-disabled): leave `priority` out, or start it with "
                                    "--enable-priority-scheduling")

    def make_requests(self, input_ids: list[int], params: SamplingParams, return_logprob: bool = False,
                      top_logprobs_num: int = 0, routed_dp_rank: int | None = None, priority: int | None = None
                      ) -> list[TokenizedGenerateReq]:
        """One scheduler request per choice (n); each choice gets its own seed, so they differ."""
        self.validate_length(len(input_ids), params)
        self.validate_dp_rank(routed_dp_rank)
        self.validate_priority(priority)
        if type(top_logprobs_num) is not int or top_logprobs_num < 0:
            raise InvalidParamError("top_logprobs_num", f"must be an int >= 0, got {top_logprobs_num!r}")
        base = params.seed if params.seed is not None else self.seed_rng.getrandbits(63)
        # choice i's seed wraps within 64 bits: a seed near 2**64 with n > 1 must still cross a node (msgpack)
        return [TokenizedGenerateReq(uuid.uuid4().hex, input_ids, params, (base + i) % 2**64, return_logprob,
                                     top_logprobs_num, routed_dp_rank, priority) for i in range(params.n)]

    # ---- streaming results ----------------------------------------------------------------------
    def submit(self, req: TokenizedGenerateReq) -> ReqState:
        """Registers one request and queues it for the scheduler (it leaves at the end of this turn of the event
        loop). generate() then yields its outputs; release() gives up one whose outputs nobody will read. A
        streaming route submits before it starts its response, so the scheduler has the request while the
        response's headers go out."""
        if self.dead_reason:
            raise SchedulerDeadError(self.dead_reason)
        state = ReqState(asyncio.get_running_loop(), len(req.input_ids))
        self.rid_to_state[req.rid] = state
        try:
            self._send_soon(req)
        except ServerBusyError:
            self.rid_to_state.pop(req.rid, None)
            raise
        return state

    async def generate(self, req: TokenizedGenerateReq, stream: bool = True) -> AsyncIterator[dict]:
        """Yields one request's cumulative result as it grows (only the final one unless stream), submitting it
        first unless that was done; the last result has a finish_reason. Leaving early releases it."""
        state = self.rid_to_state.get(req.rid) or self.submit(req)
        try:
            while True:
                await state.event.wait()
                state.event.clear()
                state.woken = False  # before draining: a step appended from here on schedules a new wake-up
                if not state.take_steps():
                    continue
                done = state.finish_reason is not None
                if stream or done:
                    yield state.result(req.rid)
                if done:
                    return
        finally:
            self.release(req)

    def release(self, req: TokenizedGenerateReq) -> None:
        """Forgets a submitted request (nothing if it is forgotten already). One not finished is taken back if it
        has not left yet, else aborted, which frees its KV cache."""
        state = self.rid_to_state.pop(req.rid, None)
        if state is None:
            return
        if not state.finished and not self.dead_reason and not self._take_back(req):
            self.send(AbortReq(req.rid))  # the consumer left: free the request's KV
            # counted here: the replica's answer to the abort finds no state left to count it
            self.metrics.on_finished(state.prompt_tokens, len(state.output_ids), 0, state.ttft(),
                                     time.perf_counter() - state.created, aborted=True)

    def handle_output(self, msg: object) -> None:
        """Entry point for everything the detokenizer sends back. Thread-safe."""
        if isinstance(msg, BatchStrOutput):
            self._handle_batch(msg)
        elif isinstance(msg, RpcOutput):
            waiter = self.rpc_waiters.get(msg.rid)
            if waiter is not None:
                waiter.add(msg)
        else:
            logger.error("tokenizer manager got an unknown message %r", type(msg).__name__)

    def _handle_batch(self, out: BatchStrOutput) -> None:
        if out.stats is not None:
            self.metrics.on_scheduler_stats(out.stats)
        now = time.perf_counter()
        to_wake = []
        reqs = out.reqs
        for i, rid in enumerate(reqs.rids):
            state = self.rid_to_state.get(rid)
            if state is None:
                continue  # aborted and already gone
            reason, new = reqs.finished_reasons[i], reqs.new_token_ids[i]
            if new:
                if state.first_token_time is None:
                    state.first_token_time = now
                    self.metrics.ttft.observe(now - state.created)
                elif state.last_token_time is not None:
                    self.metrics.itl.observe((now - state.last_token_time) / len(new))
                state.last_token_time = now
            state.steps.append(StepOut(out.text_deltas[i], reqs, i, now))
            if reason is not None:
                state.finished = True
                self.metrics.on_finished(reqs.prompt_tokens[i], reqs.completion_tokens[i], reqs.cached_tokens[i],
                                         state.ttft(), now - state.created, reason["type"] == "abort")
            to_wake.append(state)
        self._wake(to_wake)

    @staticmethod
    def _wake(states: list[ReqState]) -> None:
        """One call per event loop for the whole batch (each call_soon_threadsafe writes to the loop's pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[ReqState]] = {}
        for state in states:
            if not state.woken:
                state.woken = True
                by_loop.setdefault(state.loop, []).append(state)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_events, group)
            except RuntimeError:  # that loop is closed: its consumers are gone
                pass

    # ---- control --------------------------------------------------------------------------------
    async def _rpc(self, msg, timeout: float = 30.0) -> list[RpcOutput]:
        """Sends a control request to every replica (through the DP controller when dp > 1) and gathers their
        answers, ordered by dp_rank."""
        if self.dead_reason:
            raise SchedulerDeadError(self.dead_reason)
        msg.rid = uuid.uuid4().hex
        waiter = _RpcWaiter(asyncio.get_running_loop(), self.dp_size)
        self.rpc_waiters[msg.rid] = waiter
        self.send(msg)
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        finally:
            self.rpc_waiters.pop(msg.rid, None)

    async def flush_cache(self) -> bool:
        """Empties every replica's prefix cache; False when requests are in flight on one of them (then that
        one flushes nothing)."""
        return all(r.success for r in await self._rpc(FlushCacheReq()))

    async def get_internal_state(self) -> list[dict]:
        """Each replica's live state, with its dp_rank, in dp_rank order, and the requests the front end holds
        (the whole deployment's, repeated in each: a leak check sees every process's count in one place)."""
        return [{"dp_rank": r.dp_rank, **r.data, "front_end_requests": len(self.rid_to_state)}
                for r in await self._rpc(GetInternalStateReq())]

    def _fail_request(self, rid: str, message: str) -> None:
        """Ends one waiting request with an error (from the sender thread)."""
        state = self.rid_to_state.get(rid)
        if state is not None:
            self._abort([(rid, state)], message)

    def fail_all(self, message: str) -> None:
        """A scheduler is gone: every waiting request ends with an error instead of hanging."""
        self.dead_reason = self.dead_reason or message
        self._abort(list(self.rid_to_state.items()), message)
        for waiter in list(self.rpc_waiters.values()):
            waiter.fail(SchedulerDeadError(message))

    def _abort(self, states: list[tuple[str, ReqState]], message: str) -> None:
        """Gives each request a final abort output carrying `message` and wakes its consumer."""
        now = time.perf_counter()
        for rid, state in states:
            state.finished = True
            aborted = ReqOutputs.aborted(rid, message, state.prompt_tokens, len(state.output_ids))
            state.steps.append(StepOut("", aborted, 0, now))
        self._wake([state for _, state in states])


class _RpcWaiter:
    """Gathers the answers of every replica to one control request (added from the receiving thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int):
        self.loop, self.expected = loop, expected
        self.future = loop.create_future()
        self.replies: list[RpcOutput] = []

    def add(self, reply: RpcOutput) -> None:
        self.replies.append(reply)
        if len(self.replies) == self.expected:
            replies = sorted(self.replies, key=lambda r: r.dp_rank)
            self.loop.call_soon_threadsafe(lambda: self.future.done() or self.future.set_result(replies))

    def fail(self, error: Exception) -> None:
        self.loop.call_soon_threadsafe(lambda: self.future.done() or self.future.set_exception(error))
