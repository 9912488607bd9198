"""PyTorch side of the training-speed comparison: pre-training steps of pvlt_tiny with the
independent PyTorch PVLT of torch_pvlt.py (checked against the reference's small_io fixture first).

Each step is what `mvlt pretrain` does: MLM + ITM + 10 x SmoothL1 reconstruction, the input
alternating clean / grid-masked images, BatchNorm in train mode, backward, then torch.optim.AdamW
with the reference's groups (no weight decay on biases and 1-D parameters). Inputs are random
tensors made once, so the figure is compute only (mvlt's includes its data loader).

  python3 scripts/torch_train_bench.py FIXTURE_DIR --device cuda --batch 32 --steps 100 [--amp fp16|bf16]

--amp fp16 is the reference's setting (autocast + GradScaler); prints one JSON line.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from torch_pvlt import TINY, forward, parity_check, random_weights


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixtures")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none")
    ap.add_argument("--vocab-size", type=int, default=30522, help="MLM decoder size (bert-base-uncased: 30522)")
    ap.add_argument("--small", action="store_true", help="a tiny model, to test this script on a CPU")
    a = ap.parse_args()
    parity_check(a.fixtures)

    dev = torch.device(a.device)
    spec = dict(TINY, vocab=a.vocab_size)
    if a.small:
        spec.update(embed_dims=[8, 16, 16, 16], num_heads=[1, 2, 2, 2], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1],
                    hidden=16, vocab=120, T=8, t2i_channel=4)
    sd, cfg = random_weights(spec, dev)
    buffers = {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}
    params = {k: v.requires_grad_(True) for k, v in sd.items() if v.is_floating_point() and k not in buffers}
    decay = [p for k, p in params.items() if p.ndim > 1 and not k.endswith(".bias")]
    no_decay = [p for k, p in params.items() if not (p.ndim > 1 and not k.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=a.amp == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.amp)

    g = torch.Generator().manual_seed(0)
    B, S, T, V = a.batch, a.image_size, spec["T"], spec["vocab"]
    images = torch.rand(B, 3, S, S, generator=g).to(dev)
    cell = S // 16
    m = (torch.rand(B, 16, 16, generator=g) < 0.5).repeat_interleave(cell, 1).repeat_interleave(cell, 2).to(dev)
    masked = images.masked_fill(m[:, None], 1e-6)
    ids = torch.randint(1000 if V > 2000 else 5, V, (B, T), generator=g).to(dev)
    mlm = torch.where(torch.rand(B, T, generator=g).to(dev) < 0.15, ids, torch.full_like(ids, -1))
    ids = torch.where(mlm >= 0, torch.full_like(ids, 103 if V > 103 else 1), ids)
    itm = torch.randint(0, 2, (B,), generator=g).to(dev)

    def step(k):
        with torch.autocast(device_type=dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward({**params, **buffers}, cfg, masked if k % 2 else images, ids, {"itm", "mlm", "t2i"}, train=True)
            loss = (F.cross_entropy(out["mlm_logits"].reshape(-1, V).float(), mlm.reshape(-1), ignore_index=-1)
                    + F.cross_entropy(out["itm_logits"].reshape(B, 2).float(), itm)
                    + 10 * F.smooth_l1_loss(out["t2i_logits"].float(), images))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for k in range(a.warmup):
        step(k)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(a.steps):
        loss = step(k)
    sync()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "device": str(dev), "amp": a.amp, "batch": B,
                      "image_size": S, "steps": a.steps, "samples_per_s": round(B * a.steps / secs, 2),
                      "s_per_step": round(secs / a.steps, 4), "peak_mem_gib": peak and round(peak, 2), "last_loss": round(loss.item(), 4)}))


if __name__ == "__main__":
    main()
