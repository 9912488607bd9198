"""The PyTorch side of scripts/bench-all-reduce.sh: all-reduce of MiB megabytes of f32 over the
ranks torchrun started (Gloo), timed as mvlt bench-all-reduce times it; rank 0 prints one JSON line."""
import json, statistics, sys, time
import torch, torch.distributed as dist
mib, iters = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
start = torch.full((mib * (1 << 20) // 4,), float(rank + 1))
times = []
for i in range(2 + iters):
    t = start.clone()
    t0 = time.perf_counter()
    dist.all_reduce(t)
    if i >= 2:
        times.append(time.perf_counter() - t0)
med = statistics.median(sorted(times))
algbw = mib * (1 << 20) / med / 1e9
if rank == 0:
    print(json.dumps({"engine": f"torch.distributed {torch.__version__} (Gloo)", "ranks": world, "mib": mib,
                      "iters": iters, "median_s": med, "min_s": min(times), "algbw_gb_s": algbw,
                      "busbw_gb_s": algbw * 2 * (world - 1) / world}))
dist.destroy_process_group()
