"""Incremental detokenization of one request's output: text deltas that never split a multi-byte character
and never show a stop string (or the start of one that may still complete)."""

from gridserve.messages import CONTEXT_TOKENS, BatchStrOutput, BatchTokenIDOutput, RpcOutput
from gridserve.tokenizer import decode_batch


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stop = stop
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (stop strings not yet cut)
        self.read_offset = 0  # ids[:read_offset] are reflected in self.text
        self.sent = 0  # characters of the visible text already returned

    def windows(self, new_ids: list[int]) -> tuple[list[int], list[int]]:
        """Appends tokens; returns the ids to decode: the unread tokens with a little context, and the context
        alone (its text is cut off the first). Call `apply` with both texts."""
        self.ids += new_ids
        window = self.context + self.ids[max(0, self.read_offset - CONTEXT_TOKENS) : self.read_offset]
        return window + self.ids[self.read_offset :], window

    def apply(self, full: str, prefix: str, finished: bool) -> str:
        """Takes the decoded windows; returns the visible text delta."""
        # a trailing U+FFFD means a multi-byte character is still incomplete: wait for its next byte
        if len(full) > len(prefix) and (finished or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
        return self._visible_delta(finished)

    def add(self, new_ids: list[int], finished: bool) -> str:
        """Appends tokens; returns the visible text delta (one request alone; the manager batches)."""
        full, prefix = self.windows(new_ids)
        return self.apply(*decode_batch(self.tokenizer, [full, prefix], self.skip), finished)

    def _visible_delta(self, finished: bool) -> str:
        visible = self.text
        if not self.stop:
            delta, self.sent = visible[self.sent :], len(visible)
            return delta
        # A stop string cannot start inside the text already sent (a tail that could begin one is held back).
        cut = min((i for i in (visible.find(s, self.sent) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            visible = visible[:cut]
        elif not finished:  # hold back a tail that could be the start of a stop string
            visible = visible[: len(visible) - _partial_stop_len(visible, self.stop)]
        delta = visible[self.sent :]
        self.sent = max(self.sent, len(visible))
        return delta

    @property
    def output_text(self) -> str:
        return self.text[: self.sent]


def _partial_stop_len(text: str, stops: list[str]) -> int:
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


class DetokenizerManager:
    """Turns the scheduler's token outputs into text deltas for every request in flight."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, IncrementalDetokenizer] = {}

    def handle(self, out: BatchTokenIDOutput) -> BatchStrOutput:
        reqs = out.reqs
        deltas = [""] * len(reqs.rids)
        work: list[tuple[int, IncrementalDetokenizer, bool]] = []
        for i, rid in enumerate(reqs.rids):
            init = out.detok_init[i] if out.detok_init else None
            if init is not None:
                self.states[rid] = IncrementalDetokenizer(self.tokenizer, init.prompt_tail, init.stop,
                                                          init.skip_special_tokens)
            finished = reqs.finished_reasons[i] is not None
            state = self.states.pop(rid, None) if finished else self.states.get(rid)
            if state is not None:
                work.append((i, state, finished))
        # One batched decode per skip_special_tokens setting for the whole step.
        for skip in {state.skip for _, state, _ in work}:
            group = [w for w in work if w[1].skip == skip]
            windows = [state.windows(reqs.new_token_ids[i]) for i, state, _ in group]
            texts = decode_batch(self.tokenizer, [f for f, _ in windows] + [p for _, p in windows], skip)
            for j, (i, state, finished) in enumerate(group):
                deltas[i] = state.apply(texts[j], texts[len(group) + j], finished)
        return BatchStrOutput(reqs, deltas, out.stats)


def run_detokenizer_process(args, port_args, model_path: str, pipe_writer) -> None:
    """The detokenizer process: token ids in from the scheduler, text out to the TokenizerManager."""
    import sys
    import traceback

    import zmq

    from gridserve.ipc import Channel
    from gridserve.process_utils import freeze_startup_objects, init_child_process, parent_alive
    from gridserve.tokenizer import get_decoder

    parent = init_child_process("detokenizer", args.log_level)
    try:
        ctx = zmq.Context()
        typed = port_args.typed
        pull = Channel(ctx, zmq.PULL, [port_args.detokenizer_input, port_args.remote_detokenizer_input], typed)
        push = Channel(ctx, zmq.PUSH, port_args.tokenizer_input, typed)
        manager = DetokenizerManager(get_decoder(model_path, args.tokenizer_path))
    except Exception:
        pipe_writer.send({"status": "error", "message": traceback.format_exc()})
        sys.exit(1)
    pipe_writer.send({"status": "ready"})
    pipe_writer.close()
    freeze_startup_objects()
    while parent_alive(parent):
        for msg in pull.recv_all(100):
            if isinstance(msg, BatchTokenIDOutput):
                msg = manager.handle(msg)
            elif isinstance(msg, RpcOutput) and msg.data:  # an internal-state answer: add what this process holds
                msg.data["detokenizer_requests"] = len(manager.states)
            push.send(msg)
