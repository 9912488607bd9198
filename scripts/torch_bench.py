"""PyTorch's side of `mvlt bench --compare-pytorch`: the same cases as mvlt's, one repetition per
request, so the two sides alternate within one invocation.

Started by mvlt with `--fixtures DIR --threads N --device cpu|cuda`; it checks its PVLT
(torch_pvlt.py) against the reference's small_io fixture first, answers {"ready": ...}, then reads
one JSON request per line from standard input and answers one JSON line each:
  {"case": "forward", "batch": 16, "heads": ["itm"]}        -> {"secs": ...}   (eval, no_grad)
  {"case": "train", "batch": 8, "mlm": "masked" | "all"}    -> {"secs": ...}   (forward, backward, AdamW)
  {"case": "train", ..., "model": "micro", "image": 64, "text": 16}   (the demo's model, crates/mvlt/configs/pvlt_micro.json)
  {"case": "memory"}                                       -> {"peak_rss_mib": ..., "peak_cuda_mib": ...}
The model is pvlt_tiny with random weights, 256 px, T = 128, bert-base-uncased's 30,522-word decoder,
unless a request names the micro PVLT.
"""
import argparse
import contextlib
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

from torch_pvlt import TINY, forward, parity_check, random_weights

S, T, V = 256, 128, 30522
# crates/mvlt/configs/pvlt_micro.json over TINY's other keys, at the demo's 64 px and T = 16.
MICRO = dict(TINY, embed_dims=[32, 64, 96, 128], num_heads=[1, 2, 2, 4], mlp_ratios=[4, 4, 4, 4], depths=[1, 1, 1, 1],
             hidden=128, t2i_channel=16, img_size=64, T=16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with contextlib.redirect_stdout(sys.stderr):  # standard output carries the answers only
        parity_check(a.fixtures)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    eval_sd, cfg = random_weights(TINY, dev)
    trainers = {}  # model name -> (weights, config, optimiser)
    inputs = {}

    def batch(n, s=S, t=T):
        if (n, s, t) not in inputs:
            images = torch.rand(n, 3, s, s, generator=g).to(dev)
            ids = torch.randint(1000, 30000, (n, t), generator=g).to(dev)
            inputs[n, s, t] = (images, ids)
        return inputs[n, s, t]

    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev)}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        case = req["case"]
        if case == "forward":
            images, ids = batch(req["batch"])
            with torch.no_grad():
                sync()
                t0 = time.perf_counter()
                out = forward(eval_sd, cfg, images, ids, set(req["heads"]))
                for v in out.values():
                    v.sum().item()
                secs = time.perf_counter() - t0
            print(json.dumps({"secs": secs}), flush=True)
        elif case == "train":
            model = req.get("model", "tiny")
            if model not in trainers:
                train_sd, train_cfg = random_weights(MICRO if model == "micro" else TINY, dev, seed=1)
                buffers = {k: v for k, v in train_sd.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
                params = {k: v.requires_grad_(True) for k, v in train_sd.items() if k not in buffers}
                decay = [p for k, p in params.items() if p.ndim > 1 and not k.endswith(".bias")]
                rest = [p for k, p in params.items() if not (p.ndim > 1 and not k.endswith(".bias"))]
                opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-4)
                trainers[model] = (train_sd, train_cfg, opt)
            train_sd, train_cfg, opt = trainers[model]
            B, Tn = req["batch"], req.get("text", T)
            images, ids = batch(B, req.get("image", S), Tn)
            labels = torch.where(torch.rand(B, Tn, generator=g).to(dev) < 0.15, ids, torch.full_like(ids, -1))
            corrupted = torch.where(labels >= 0, torch.full_like(ids, 103), ids)
            itm = torch.randint(0, 2, (B,), generator=g).to(dev)
            sync()
            t0 = time.perf_counter()
            if req["mlm"] == "masked":
                rows = (labels.reshape(-1) >= 0).nonzero().squeeze(1)
                out = forward(train_sd, train_cfg, images, corrupted, {"itm", "mlm", "t2i"}, train=True, mlm_rows=rows)
                mlm = F.cross_entropy(out["mlm_logits"], labels.reshape(-1)[rows])
            else:
                out = forward(train_sd, train_cfg, images, corrupted, {"itm", "mlm", "t2i"}, train=True)
                mlm = F.cross_entropy(out["mlm_logits"].reshape(-1, V), labels.reshape(-1), ignore_index=-1)
            loss = mlm + F.cross_entropy(out["itm_logits"].reshape(B, 2), itm) + 10 * F.smooth_l1_loss(out["t2i_logits"], images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
            sync()
            print(json.dumps({"secs": time.perf_counter() - t0}), flush=True)
        elif case == "memory":
            cuda = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
            print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_cuda_mib": cuda}), flush=True)
        else:
            print(json.dumps({"error": f"unknown case {case}"}), flush=True)


if __name__ == "__main__":
    main()
