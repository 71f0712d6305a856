"""NCCL all-reduce on the GPUs of one host, at the sizes a decode step sends: one (batch, hidden) tensor in bf16,
replayed from a CUDA graph as the decode graphs do. Prints microseconds per all-reduce, for the share of a
tensor-parallel decode step that communication takes (issue 21).

    python3 scripts/bench_allreduce.py [--gpus 2 --hidden 4096 --batches 1,8,64,256 --output-json F]"""

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=args.gpus, device_id=torch.device("cuda", rank))
    stream = torch.cuda.Stream()
    torch.cuda.set_stream(stream)
    out = {}
    for bs in map(int, args.batches.split(",")):
        x = torch.ones(bs, args.hidden, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):  # NCCL sets up its channels on the first calls, outside the graph
            dist.all_reduce(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(args.per_graph):
                dist.all_reduce(x)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out[bs] = 1e3 * start.elapsed_time(end) / (args.replays * args.per_graph)
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--per-graph", type=int, default=64, help="all-reduces captured in one graph, as a step has")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, 29512, results), nprocs=args.gpus)
        results = dict(results)
    print(f"all-reduce of (batch, {args.hidden}) bf16 over {args.gpus} GPUs, from a CUDA graph:")
    for bs, us in results.items():
        print(f"  batch {bs}: {us:.1f} us")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"gpus": args.gpus, "hidden": args.hidden, "us": results}, f)


if __name__ == "__main__":
    main()
