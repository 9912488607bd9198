"""Why ITM does not learn in CPU-sized pre-training runs: an experiment with the independent PyTorch
PVLT of torch_pvlt.py (the architecture of mvlt's micro config; the reference's init, except that every
embedding table here is N(0, 0.02) where the reference draws BERT's position and token-type tables
from N(0, 1)).

The captions of a synthetic catalogue are cut to "<colour> <sub-category>." so that a masked word can
only be predicted from the image. It trains the micro PVLT (64 px) and reports, every 250 steps, the
accuracy of predicting a masked colour word with the product's own image and with a neighbouring
row's image (often another view of the same product, so an upper bound on what the text alone gives).

  mvlt synth --out /tmp/cat --n 800 --size 64
  python3 scripts/grounding_experiment.py /tmp/cat --mask sparse --objectives full --steps 1500
  python3 scripts/grounding_experiment.py /tmp/cat --mask dense  --objectives full --steps 12000

--mask sparse: the reference's MLM (each word piece with p = 0.15; [MASK] always here).
--mask dense: exactly one of the colour and the noun is masked in every caption.
--mask none: no masking (with --objectives itm).
--objectives mlm: MLM only; itm: ITM only (negatives take another row's colour and noun); full:
MLM + ITM + 10 x SmoothL1 reconstruction, as in pre-training. Batch 32, AdamW lr 3e-4, weight decay
0.01. With ITM, the held-out ITM accuracy is reported too (fixed pairs, half negatives).

ITM alone on unmasked captions (--mask none --objectives itm), measured on a 2-core CPU with an
800-image 64 px catalogue; no run's held-out accuracy left 0.463 / 0.538 (one class for every pair):
  default (micro, lr 3e-4)                    12000 steps
  --lr 1e-3                                   45500 steps (41 min; batch loss 0.684-0.705 from step 1000)
  --lr 1e-3 --depths 2,2,2,2                   4000 steps
  --lr 3e-3                                    4000 steps
  --lr 1e-3 --batch 128                        2000 steps
  --lr 1e-3 --itm-read mean                    3000 steps
  --lr 1e-3 --init-std 0.1                     3000 steps
  --width tiny (pvlt_tiny's widths)            1500 steps
  --model control --lr 1e-3 (a late-fusion CNN + word embedding + MLP, 21 s for 6000 steps): the
  batch loss leaves ln 2 by step 1000 and is 0.12-0.21 from step 3000; held-out accuracy 0.74 at
  step 2000, 0.75-0.79 from step 3000 on. The task itself is learnable from these pairs.

On an H100 (--device cuda, scripts/gpu_check.sh, four runs side by side for 6.5 minutes):
  --mask none --objectives itm --width tiny --depths 2,2,2,2 --batch 128 --lr 3e-4   8500 steps, one class
  --mask sparse --objectives full, the same model                                   6500 steps, ITM at ln 2
  --mask none --objectives itm --batch 512 --lr 1e-3                                9500 steps, one class
  --mask none --objectives itm --batch 128 --lr 3e-4 --init-std 0.1: LEARNS. Batch loss 0.65 at step
  1000, 0.14 at 2000; held-out accuracy 0.75 at step 2000 and 0.68-0.78 up to step 10500.
And on the CPU, all three objectives with that init:
  --mask sparse --objectives full --batch 128 --lr 3e-4 --init-std 0.1: ITM batch loss 0.51 at step
  500, 0.22 at 1000; held-out ITM accuracy 0.74 at step 500, 0.84 at 1000; masked colours 0.76 right
  with the product's image against 0.48 with a neighbouring row's (1000 steps in 8 minutes on one core).
  The same with --masked-odd (grid-masked images on odd steps, as in pre-training): ITM batch loss
  0.52 at step 700, 0.35 at 900; held-out 0.71-0.73 from step 600.
Started from mvlt's own initial weights (--init-from: `mvlt pretrain --set max_steps=1 --set
warmup_lr=1e-12` with crates/mvlt/configs/pvlt_micro.json on the scripts/short_captions.py catalogue, whose
token ids are this script's), --mask sparse --objectives full --masked-odd --batch 128 --lr 3e-4:
  ITM batch loss 0.58 at step 600, 0.33 at 700, 0.19 at 1000; held-out 0.79-0.90 from step 700.
  With --reference-pairs as well: 0.65 at step 800, 0.43 at 1000; held-out 0.65-0.71 from step 800.
  mvlt itself on that catalogue, from those weights (README, Training): ITM leaves ln 2 at about
  step 770 and is 0.38-0.39 at step 1000.
Why the init matters: with Linear weights at std 0.02 and a few dozen channels, each Linear scales
its input by about 0.02 * sqrt(C) = 0.1, so the attention output (two Linears: value, projection)
added to a text token is about 1% of that token at initialisation, and the part of it that depends
on the image is smaller still (measured: swapping the images changes the stage-4 text features by
0.002 on average, swapping the captions by 0.3).
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from short_captions import COLOURS, SPECIALS, caption_colour, vocabulary
from torch_pvlt import forward, random_weights


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("catalog")
    ap.add_argument("--mask", choices=["sparse", "dense", "none"], default="sparse")
    ap.add_argument("--objectives", choices=["mlm", "itm", "full"], default="full")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depths", default="1,1,1,1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", choices=["micro", "tiny"], default="micro", help="micro: crates/mvlt/configs/pvlt_micro.json's widths; tiny: pvlt_tiny's")
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the Linear weights' init (the reference: 0.02)")
    ap.add_argument("--itm-read", choices=["cls", "mean"], default="cls",
                    help="diagnostic only: 'mean' feeds the ITM head the mean of the stage-4 text tokens instead of [CLS] (not the reference)")
    ap.add_argument("--model", choices=["pvlt", "control"], default="pvlt",
                    help="control (with --objectives itm): a small CNN on the image and a word embedding of the caption, concatenated, "
                         "then an MLP; shows how quickly a plain late-fusion model learns the same matching task")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; the random draws (data order, masks, init) stay on the CPU, so a seed picks the same run on both")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--init-from", help="start from these weights (e.g. an mvlt run's step-1 weights written with warmup_lr=1e-12, "
                    "on a catalogue whose vocab.txt lists this script's vocabulary in its order) instead of drawing them")
    ap.add_argument("--reference-pairs", action="store_true",
                    help="build the ITM pair before MLM masking, as the reference and mvlt do: a negative's masked words are then "
                         "labelled with the other product's words (default: with the image's own words)")
    ap.add_argument("--masked-odd", action="store_true",
                    help="as mvlt pretrain and the reference: odd steps feed the image with half of its 16x16 grid cells set to 1e-6")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    rows = [json.loads(l) for l in open(f"{a.catalog}/catalog.jsonl")]
    subs = sorted({r["subcategory"] for r in rows})
    V = len(vocabulary(subs))
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(f"{a.catalog}/{r['image']}").convert("RGB").resize((64, 64)), dtype=np.float32) / 255).permute(2, 0, 1) for r in rows]).to(dev)
    col_id = torch.tensor([len(SPECIALS) + COLOURS.index(caption_colour(r["caption"])) for r in rows])
    sub_id = torch.tensor([len(SPECIALS) + len(COLOURS) + subs.index(r["subcategory"]) for r in rows])
    N = len(rows)
    n_train = N * 9 // 10
    widths = {"micro": {"embed_dims": [32, 64, 96, 128], "num_heads": [1, 2, 2, 4], "mlp_ratios": [4, 4, 4, 4], "hidden": 128},
              "tiny": {"embed_dims": [64, 128, 320, 512], "num_heads": [1, 2, 5, 8], "mlp_ratios": [8, 8, 4, 4], "hidden": 768}}[a.width]
    spec = {**widths, "sr_ratios": [8, 4, 2, 1], "depths": [int(d) for d in a.depths.split(",")], "vocab": V, "T": 6, "n_sup": 2, "n_sub": 2, "t2i_channel": 8, "img_size": 64, "patch_size": 4}
    sd, cfg = random_weights(spec, "cpu", seed=a.seed)
    sd = {k: v.to(dev) for k, v in sd.items()}
    # The reference's init: zero biases, unit LayerNorm/BatchNorm weights (random_weights perturbs them).
    for k in list(sd):
        if k.endswith((".bias", "linear_bias")):
            sd[k] = torch.zeros_like(sd[k])
        elif k.endswith(".weight") and sd[k].ndim == 1:
            sd[k] = torch.ones_like(sd[k])
        elif k.endswith(".weight") and sd[k].ndim == 2 and "embeddings" not in k:
            sd[k] = sd[k] * (a.init_std / 0.02)
    if a.init_from:
        from safetensors.torch import load_file
        sd = {k: v.to(dev) for k, v in load_file(a.init_from).items() if v.is_floating_point()}
        V = sd["text_embeddings.word_embeddings.weight"].shape[0]
    buffers = {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}
    params = {k: v.clone().requires_grad_(True) for k, v in sd.items() if v.is_floating_point() and k not in buffers}
    opt = torch.optim.AdamW(params.values(), lr=a.lr, weight_decay=0.01)
    use_mlm, use_itm, use_t2i = a.objectives in ("mlm", "full"), a.objectives in ("itm", "full"), a.objectives == "full"
    heads = {h for h, on in (("mlm", use_mlm), ("itm", use_itm), ("t2i", use_t2i)) if on}

    model_forward = forward
    if a.model == "control":
        assert a.objectives == "itm", "--model control is for --objectives itm"
        cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.GELU(), torch.nn.Conv2d(16, 32, 4, 4), torch.nn.GELU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        emb = torch.nn.Embedding(V, 32)
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 2))
        control = torch.nn.ModuleList([cnn, emb, mlp]).to(dev)
        opt = torch.optim.AdamW(control.parameters(), lr=a.lr, weight_decay=0.01)

        def model_forward(_sd, _cfg, images, ids, _heads, train=False):
            return {"itm_logits": mlp(torch.cat([cnn(images), emb(ids[:, 1:3]).mean(1)], 1))[:, None]}

    def itm_logits(out):
        if a.itm_read == "cls":
            return out["itm_logits"]
        from torch_pvlt import lin, ln
        sd = {**params, **buffers}
        e = ln(lin(out["text_feats.3"].mean(1, keepdim=True), sd, "itm_head_embed.0"), sd, "itm_head_embed.1", 1e-5)
        return lin(e, sd, "itm_head.linear") + sd["itm_head.linear_bias"]

    def captions(idx):
        return torch.stack([torch.tensor([1, col_id[i], sub_id[i], 4, 2, 0]) for i in idx])

    def with_negatives(ids, itm, g=None):
        # Negatives take another row's colour and noun (where not masked).
        other = torch.randint(0, N, (len(ids),), generator=g)
        neg = itm == 0
        for pos, table in ((1, col_id), (2, sub_id)):
            ids[neg, pos] = torch.where(ids[neg, pos] == 3, ids[neg, pos], table[other[neg]])
        return ids

    held_out = list(range(n_train, N))
    g = torch.Generator().manual_seed(1)
    held_itm = torch.randint(0, 2, (len(held_out),), generator=g)
    held_ids = with_negatives(captions(held_out), held_itm, g)

    def evaluate():
        ids = captions(held_out)
        truth = ids[:, 1].clone()
        ids[:, 1] = 3
        res = {}
        with torch.no_grad():
            if use_mlm:
                for name, im in (("colour_acc_own_image", imgs[held_out]), ("colour_acc_neighbour_image", imgs[held_out].roll(1, 0))):
                    out = model_forward({**params, **buffers}, cfg, im, ids.to(dev), {"mlm"})
                    res[name] = round((out["mlm_logits"][:, 1].argmax(-1).cpu() == truth).float().mean().item(), 3)
            if use_itm:
                out = model_forward({**params, **buffers}, cfg, imgs[held_out], held_ids.to(dev), {"itm"})
                res["itm_acc_held_out"] = round((itm_logits(out).reshape(-1, 2).argmax(-1).cpu() == held_itm).float().mean().item(), 3)
        return res

    t0 = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, n_train, (a.batch,)).tolist()
        ids = captions(idx)
        if a.mask == "dense":
            pick = torch.zeros_like(ids, dtype=torch.bool)
            pick[torch.arange(a.batch), 1 + torch.randint(0, 2, (a.batch,))] = True
        elif a.mask == "sparse":
            pick = (torch.rand(ids.shape) < 0.15) & (torch.arange(6) >= 1) & (torch.arange(6) <= 3)
        else:
            pick = torch.zeros_like(ids, dtype=torch.bool)
        itm = torch.randint(0, 2, (a.batch,))
        if a.reference_pairs and use_itm:
            # The reference's order (and mvlt's): pick the caption first, then mask it, so the MLM
            # labels of a negative pair are the other product's words.
            ids = with_negatives(ids, itm)
        labels = torch.where(pick, ids, torch.full_like(ids, -1))
        ids = torch.where(pick, torch.full_like(ids, 3), ids)
        if use_itm and not a.reference_pairs:
            ids = with_negatives(ids, itm)
        ids, labels, itm = ids.to(dev), labels.to(dev), itm.to(dev)
        inp = imgs[idx]
        if a.masked_odd and step % 2 == 0:  # steps count from 1 here: the reference's odd (0-based) steps
            cells = torch.rand(a.batch, 16 * 16).argsort(1) < 128
            grid = cells.reshape(a.batch, 1, 16, 16).repeat_interleave(4, 2).repeat_interleave(4, 3).to(dev)
            inp = torch.where(grid, torch.full_like(inp, 1e-6), inp)
        out = model_forward({**params, **buffers}, cfg, inp, ids, heads, train=True)
        losses = {}
        if use_mlm:
            losses["mlm"] = F.cross_entropy(out["mlm_logits"].reshape(-1, V), labels.reshape(-1), ignore_index=-1)
        if use_itm:
            losses["itm"] = F.cross_entropy(itm_logits(out).reshape(-1, 2), itm)
        if use_t2i:
            losses["t2i"] = 10 * F.smooth_l1_loss(out["t2i_logits"], imgs[idx])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        if step % a.eval_every == 0:
            rec = {"step": step, **{k: round(v.item(), 4) for k, v in losses.items()}, **evaluate(), "secs": round(time.time() - t0)}
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
