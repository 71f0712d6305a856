"""gridserve.Engine: the offline API, shaped like SGLang's Engine.

    engine = gridserve.Engine(model_path=..., dtype=..., **server_args)
    engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 16})
    engine.shutdown()

It runs the same scheduler and detokenizer processes as `gridserve serve`; the TokenizerManager lives in
this process.
"""

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator

from gridserve.errors import InvalidParamError
from gridserve.launch import launch_subprocesses
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs):
        if "model" in kwargs:
            model_path = kwargs.pop("model")
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        if self.server_args.node_rank != 0:
            raise ValueError("the Engine runs node 0 of a deployment; start every other node with "
                             "`gridserve serve ... --node-rank N`")
        logging.basicConfig(level=self.server_args.log_level.upper(),
                            format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
        self.deployment = launch_subprocesses(self.server_args)
        self.tokenizer_manager = self.deployment.tm
        self.tokenizer = self.tokenizer_manager.tokenizer
        self.scheduler_info = self.deployment.scheduler_info

    # ---- public API -----------------------------------------------------------------------------
    def _requests(self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, routed_dp_rank,
                  priority):
        """Normalizes SGLang-style arguments into (is_batch, list of scheduler requests)."""
        if (prompt is None) == (input_ids is None):
            raise InvalidParamError("prompt", "give exactly one of prompt or input_ids")
        if prompt is not None:
            is_batch = isinstance(prompt, list)
            items = [(p, None) for p in (prompt if is_batch else [prompt])]
        else:
            is_batch = bool(input_ids) and isinstance(input_ids[0], list)
            items = [(None, i) for i in (input_ids if is_batch else [input_ids])]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise InvalidParamError("sampling_params", f"got {len(sampling_params)} for {len(items)} prompts")
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params)] * len(items)
        tm = self.tokenizer_manager
        reqs = []
        for (p, ids), sp in zip(items, params, strict=True):
            reqs += tm.make_requests(tm.tokenize(p, ids), sp, return_logprob, top_logprobs_num, routed_dp_rank,
                                     priority=priority)
        return is_batch, reqs

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 top_logprobs_num: int = 0, stream: bool = False, routed_dp_rank: int | None = None,
                 priority: int | None = None):
        """One result dict per prompt (per choice when n > 1); a dict for a single prompt. With stream=True,
        an iterator of cumulative results of a single prompt. routed_dp_rank pins the requests to one data-parallel
        replica (else the load balancer picks); priority orders them with --enable-priority-scheduling."""
        if stream:
            return self._sync_stream(self.async_generate(prompt, sampling_params, input_ids, return_logprob,
                                                         top_logprobs_num, stream=True, routed_dp_rank=routed_dp_rank,
                                                         priority=priority))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.async_generate(prompt, sampling_params, input_ids, return_logprob,
                                                   top_logprobs_num, routed_dp_rank=routed_dp_rank, priority=priority))
        raise RuntimeError("Engine.generate was called inside an event loop; use `await engine.async_generate`")

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             top_logprobs_num=0, stream: bool = False, routed_dp_rank: int | None = None,
                             priority: int | None = None):
        is_batch, reqs = self._requests(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num,
                                        routed_dp_rank, priority)
        if stream:
            if len(reqs) != 1:
                raise InvalidParamError("stream", "streaming takes a single prompt with n=1")
            return self.tokenizer_manager.generate(reqs[0])
        results = await asyncio.gather(*(self._final(r) for r in reqs))
        return results if is_batch or len(results) > 1 else results[0]

    async def _final(self, req) -> dict:
        last = None
        async for out in self.tokenizer_manager.generate(req, stream=False):
            last = out
        last.pop("delta", None)
        return last

    @staticmethod
    def _sync_stream(coro) -> Iterator[dict]:
        loop = asyncio.new_event_loop()
        try:
            agen: AsyncIterator[dict] = loop.run_until_complete(coro)
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def flush_cache(self) -> bool:
        """Empties the prefix cache; False when requests are in flight."""
        return asyncio.run(self.tokenizer_manager.flush_cache())

    def get_server_info(self) -> dict:
        """Server arguments, scheduler limits and each replica's live internal state (`internal_states`)."""
        states = asyncio.run(self.tokenizer_manager.get_internal_state())
        return {**dataclasses.asdict(self.server_args), **self.scheduler_info, "internal_states": states}

    def shutdown(self) -> None:
        self.deployment.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
