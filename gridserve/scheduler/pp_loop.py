"""The pipeline-parallel event loop: pp_size micro-batches in flight.

Every stage runs the same scheduler, so every stage makes the same batching decisions, one micro-batch per
loop iteration ("slot"). In slot s a stage:
1. reads the results of the micro-batch it launched in slot s - pp (the last stage sampled them; they have
   come back around), and processes them as any loop does;
2. takes the slot's new requests: stage 0 from the tokenizer (via the IO rank), a later stage from the stage
   before it, passing them on;
3. schedules micro-batch s from requests that are not in flight, and runs its layers of it: it receives the
   previous stage's hidden states and sends its own on; the last stage samples and sends the tokens to every
   other stage.
Object sends never wait (their handles are kept until they complete); a stage waits for its previous hidden-state
send only before its next forward. Each receive waits only on work that an earlier slot or an earlier stage
produces, so up to pp micro-batches are in flight, one on each stage.
"""

from __future__ import annotations

import time

from gridserve.scheduler.schedule_batch import ScheduleBatch
from gridserve.scheduler.scheduler import IDLE_POLL_MS


class ReadyResult:
    """Sampled tokens that arrived as host lists (the same interface as a device result being copied)."""

    def __init__(self, lists: tuple):
        self.lists = lists

    def wait(self) -> tuple:
        return self.lists


class PipelineLoop:
    def __init__(self, scheduler):
        self.sched = scheduler
        self.pp = scheduler.runner.pp
        self.inflight: list[ScheduleBatch | None] = [None] * self.pp.size
        self.sends: list[tuple] = []  # (request, buffer) of object sends still in flight
        self.max_in_flight = 0  # the most micro-batches in flight at once, for /server_info
        self.micro_batches = 0
        self.active_s = 0.0  # wall time with work in flight: against the stage's busy time, its idle fraction

    def run(self) -> None:
        s, slot = self.sched, 0
        while not s.stopped:
            t0, active = time.perf_counter(), any(b is not None for b in self.inflight)
            i = slot % self.pp.size
            if self.inflight[i] is not None:
                self.finish(self.inflight[i])
                self.inflight[i] = None
            s.process_input_requests(self.inputs())
            batch = s.get_next_batch_to_run()
            if batch is not None:
                self.launch(batch)
                self.inflight[i] = batch
                self.micro_batches += 1
            self.max_in_flight = max(self.max_in_flight, sum(b is not None for b in self.inflight))
            self._reap_sends()
            s.end_iteration()
            slot += 1
            if active or batch is not None:
                self.active_s += time.perf_counter() - t0

    def idle_fraction(self) -> float:
        """The share of the time with work in flight that this stage's device was not running its layers."""
        return max(0.0, 1.0 - self.sched.runner.busy.busy_s() / self.active_s) if self.active_s else 0.0

    def inputs(self) -> list:
        pp, s = self.pp, self.sched
        if pp.is_first:
            busy = any(b is not None for b in self.inflight)
            msgs = s.recv(IDLE_POLL_MS if s.is_idle() and not busy else 0)
        else:
            msgs = pp.recv_object(pp.rank - 1)
        if not pp.is_last:
            self.sends += pp.send_object_async(msgs, pp.rank + 1)
        return msgs

    def launch(self, batch: ScheduleBatch) -> None:
        s, runner = self.sched, self.sched.runner
        fb = s.prepare_forward(batch, None)
        logits = runner.forward_stage(fb)
        if self.pp.is_last:
            lists = s.sample(batch, logits, None).copy_to_host().wait()
            batch.result = ReadyResult(lists)
            for dst in range(self.pp.size - 1):
                self.sends += self.pp.send_object_async(lists, dst)
        s.advance(batch)

    def finish(self, batch: ScheduleBatch) -> None:
        if not self.pp.is_last:
            batch.result = ReadyResult(self.pp.recv_object(self.pp.size - 1))
        self.sched.process_batch_result(batch)

    def _reap_sends(self) -> None:
        self.sends = [(req, buf) for req, buf in self.sends if not req.is_completed()]
