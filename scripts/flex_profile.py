#!/usr/bin/env python3
"""Profile the demo's pre-training step on flex, by operation kind, for one or more mvlt binaries.

    scripts/flex_profile.py BINARY [BINARY ...] [--rounds 3] [--iters 8]

Each round runs every binary once, alternating (so a machine whose speed drifts affects both
alike), `mvlt bench --config micro --image-size 64 --batch 64 --train-step` under `perf record`
(Linux perf, user and kernel samples at 999 Hz). Prints per binary: the median samples/s that
bench reports, the cores used (CPU seconds over wall seconds of the whole process, start-up
included), and the share of CPU time per operation kind, from the symbols the samples fall in
(self time: a matmul's time is gemm's kernels, an element-wise op's is its loop). Used for
docs/FLEX-SPEED.md; the categories are regular expressions over symbol names, below.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

# First match wins; symbols are demangled Rust/C names as perf prints them.
KINDS = [
    ("matmul (gemm)", r"gemm|matmul|sgemm"),
    ("convolution / patch product", r"conv|im2col|col2im"),
    ("softmax", r"softmax"),
    ("layer norm / batch norm", r"layer_norm|layernorm|batch_norm"),
    ("exp / erf / gelu / tanh", r"erf|exp_f32|\bexp|gelu|tanh|expf"),
    ("reductions", r"reduce|sum_|_sum|mean|argmax|max_dim"),
    ("element-wise (binary, unary, scalar)", r"binary|unary|scalar_op|zip_map|par::|compare|mask|clamp|powf|sqrt"),
    # The patched flex's parallel loops (vendor/burn-flex/src/par.rs) are inlined into rayon's
    # folder: element-wise work and copies, split over the threads.
    ("element-wise and copies inlined in rayon's parallel loops", r"Folder::consume_iter|fold_with|bridge_producer"),
    ("copies / layout (contiguous, gather, slice, cat)", r"copy|gather|slice|cat_|permute|transpose|memmove|memcpy"),
    ("memory (zeroing, page faults, alloc)", r"memset|clear_page|page_fault|alloc|free|mmap|munmap|zero"),
    ("random numbers (masks, init)", r"rand|Distribution|sampler|chacha|xoshiro"),
    ("AdamW", r"adam|optim"),
    ("autodiff bookkeeping", r"burn_autodiff|graph|Node|checkpoint"),
    ("images and text (data)", r"png|image|jpeg|decode|token|resize|synth"),
    ("threads (rayon's waits, scheduling)", r"rayon|crossbeam|futex|sched|schedule|switch_to|pthread"),
]


def run_one(binary, iters, tmp):
    data = os.path.join(tmp, "perf.data")
    cmd = [binary, "bench", "--config", "micro", "--image-size", "64", "--batch", "64", "--train-step",
           "--iters", str(iters)]
    timed = ["/usr/bin/time", "-f", "TIME %e %U %S", "perf", "record", "-q", "-F", "999", "-o", data, "--"] + cmd
    out = subprocess.run(timed, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"{binary} failed:\n{text}")
    sps = float(re.search(r"\(([\d.]+) samples/s\)", text).group(1))
    wall, user, sys_ = map(float, re.search(r"TIME ([\d.]+) ([\d.]+) ([\d.]+)", text).group(1, 2, 3))
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "symbol", "--percent-limit", "0.01"],
                         capture_output=True, text=True).stdout
    shares = {}
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2)
        kind = next((k for k, rx in KINDS if re.search(rx, sym, re.I)), "other")
        shares[kind] = shares.get(kind, 0.0) + pct
    # The calling thread's share: the serial part of the step (the rayon workers do the rest).
    threads = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "pid"],
                             capture_output=True, text=True).stdout
    per_tid = sorted((int(m.group(2)), float(m.group(1)))
                     for m in re.finditer(r"^\s*([\d.]+)%\s+(\d+):", threads, re.M))
    shares["main thread (serial work)"] = per_tid[0][1] if per_tid else 0.0
    return sps, (user + sys_) / wall, shares


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8)
    a = ap.parse_args()
    runs = {b: [] for b in a.binaries}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for b in a.binaries:
                runs[b].append(run_one(b, a.iters, tmp))
                sps, cores, _ = runs[b][-1]
                print(f"round {r + 1}: {b}: {sps:.1f} samples/s, {cores:.2f} cores", flush=True)
    kinds = [k for k, _ in KINDS] + ["other", "main thread (serial work)"]
    print("\n| | " + " | ".join(a.binaries) + " |")
    print("|---|" + "---|" * len(a.binaries))
    med = {b: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for b, v in runs.items()}
    print("| samples/s (median of %d) | " % a.rounds + " | ".join(f"{med[b][0]:.1f}" for b in a.binaries) + " |")
    print("| cores used | " + " | ".join(f"{med[b][1]:.2f}" for b in a.binaries) + " |")
    for k in kinds:
        cells = [statistics.mean(x[2].get(k, 0.0) for x in runs[b]) for b in a.binaries]
        if max(cells) >= 0.5:
            print(f"| {k}, % of CPU time | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if len(a.binaries) == 2:
        b0, b1 = a.binaries
        print(f"\nsamples/s ratio {b1} / {b0}: {med[b1][0] / med[b0][0]:.2f}x")


if __name__ == "__main__":
    main()
