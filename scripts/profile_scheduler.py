"""Host time of the scheduler's decode steps, in-process (no ZMQ, no detokenizer): where the CPU spends a
step, and whether it keeps ahead of the GPU. Usage (on a GPU machine):
    python scripts/profile_scheduler.py --model gridserve/configs/qwen3-0.6b --load-format dummy \
        --tokenizer-path TOK --batch-size 1 --input-len 256 --output-len 128 [--disable-overlap-schedule]"""

import argparse
import cProfile
import io
import pstats
import time

import torch

from gridserve.messages import TokenizedGenerateReq
from gridserve.model_loader.loader import load_model_config, resolve_model_path
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.scheduler.scheduler import Scheduler
from gridserve.server_args import ServerArgs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--kernels", action="store_true", help="also a torch.profiler table of the device's kernels")
    ServerArgs.add_cli_args(p)
    a = p.parse_args()
    args = ServerArgs.from_cli_args(a)
    path = resolve_model_path(args.model_path)
    sent = []
    sched = Scheduler(args, path, load_model_config(path), None, lambda block: [], sent.append)

    def requests(tag: str) -> list:
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(max_new_tokens=a.output_len, temperature=0, ignore_eos=True)
        return [TokenizedGenerateReq(f"{tag}{i}", torch.randint(0, 10000, (a.input_len,), generator=g).tolist(),
                                     params, seed=i) for i in range(a.batch_size)]

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
    run("prof")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(a.top)
    print(out.getvalue()[-6000:])
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as kp:
            run("kernels")
        print(kp.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
