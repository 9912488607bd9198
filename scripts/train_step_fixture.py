"""Build a training-step fixture in the format the training issue defines, with the independent
PyTorch PVLT of scripts/torch_pvlt.py (checked against the reference's small_io fixture first).

The inputs hold [PAD] positions; the word-embedding lookup has padding_idx 0 (MVLT-SPEC 2.1), and
the fixture also stores the lookup's and the tied decoder's parts of that gradient apart
(`grad_part/lookup/...`, `grad_part/decoder/...`).

The step: the odd (masked-image) pre-training step with all five losses, train mode (BatchNorm
batch statistics), dropout and drop_path off, then one torch.optim.AdamW step (lr 1e-3, betas
0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter). Computed in float64, stored as float32.

  python3 scripts/train_step_fixture.py --reference ../shared/fixtures/reference \\
      --config CONFIG.json [--weights W.safetensors | --write-weights W.safetensors] --out STEP.safetensors

CONFIG.json: a file with a `config` object in the format of small_io.json (optionally with
t2i_channel, num_sup_classes, num_sub_classes). Without --weights, random weights are drawn and
written to --write-weights.
"""
import argparse
import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from torch_pvlt import forward, parity_check, random_weights


def spec_of(c):
    bert = c.get("bert_config", {})
    return {
        "embed_dims": c["embed_dims"], "num_heads": c["num_heads"], "mlp_ratios": c["mlp_ratios"],
        "sr_ratios": c["sr_ratios"], "depths": c["depths"], "hidden": c["token_hidden_size"],
        "vocab": bert.get("vocab_size", 30522), "T": c["num_text_tokens"],
        "n_sup": c.get("num_sup_classes", 48), "n_sub": c.get("num_sub_classes", 122),
        "t2i_channel": c.get("t2i_channel", 64), "img_size": c.get("img_size_for_pos_embed", 224),
        "patch_size": c.get("patch_size", 4),
    }


def is_buffer(k):
    return k.endswith(("running_mean", "running_var", "num_batches_tracked")) or k == "text_embeddings.position_ids"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--write-weights")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    parity_check(a.reference)

    c = json.load(open(a.config))["config"]
    spec = spec_of(c)
    if a.weights:
        sd = load_file(a.weights)
    else:
        sd, _ = random_weights(spec, "cpu", seed=a.seed)
        sd = {k: v.contiguous() for k, v in sd.items()}
        save_file(sd, a.write_weights, metadata={"format": "pt"})
    cfg = {"img_size": spec["img_size"], "patch_size": spec["patch_size"], "num_heads": spec["num_heads"], "sr_ratios": spec["sr_ratios"]}

    g = torch.Generator().manual_seed(a.seed + 1)
    B, S, T, V = c.get("batch", 2), c.get("image_hw", 64), spec["T"], spec["vocab"]
    images = torch.rand(B, 3, S, S, generator=g)
    masked = images.clone()
    cell = S // 16
    for b in range(B):
        m = torch.rand(16, 16, generator=g) < 0.5
        pix = m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        masked[b][:, pix] = 1e-6
    ids = torch.zeros(B, T, dtype=torch.int64)
    mlm = torch.full((B, T), -1, dtype=torch.int64)
    lo = 1000 if V > 2000 else 5
    for b in range(B):
        n = int(torch.randint(4, T - 2, (1,), generator=g))
        words = torch.randint(lo, V, (n,), generator=g)
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = 101, words, 102
        pick = torch.rand(n, generator=g) < 0.3
        pick[0] = True
        for j in range(n):
            if pick[j]:
                mlm[b, j + 1] = ids[b, j + 1]
                ids[b, j + 1] = 103
    itm = torch.tensor([1 - (b % 2) for b in range(B)], dtype=torch.int64)
    sup = torch.randint(0, spec["n_sup"], (B, 1), generator=g)
    sub = torch.randint(0, spec["n_sub"], (B, 1), generator=g)

    params = {k: v.double().clone().requires_grad_(True) for k, v in sd.items() if not is_buffer(k) and v.is_floating_point()}
    buffers = {k: v.double().clone() for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}
    # The tied word embeddings enter twice: the lookup (padding_idx 0) and the MLM decoder. A second
    # leaf with the same values for the decoder gives the two gradients apart; the parameter's
    # gradient is their sum, as with one tied tensor.
    word = "text_embeddings.word_embeddings.weight"
    decoder = params[word].detach().clone().requires_grad_(True)
    out = forward({**params, **buffers, "mlm_head.mlm_decoder.weight": decoder}, cfg, masked.double(), ids, {"itm", "mlm", "t2i", "cls"}, train=True)
    losses = {
        "loss_mlm": F.cross_entropy(out["mlm_logits"].reshape(-1, V), mlm.reshape(-1), ignore_index=-1),
        "loss_itm": F.cross_entropy(out["itm_logits"].reshape(B, 2), itm),
        "loss_sup_cls": F.cross_entropy(out["sup_cls_logits"].reshape(B, -1), sup.reshape(-1)),
        "loss_sub_cls": F.cross_entropy(out["sub_cls_logits"].reshape(B, -1), sub.reshape(-1)),
        "loss_t2i": 10 * F.smooth_l1_loss(out["t2i_logits"], images.double()),
    }
    total = sum(losses.values())
    total.backward()
    lookup_part = params[word].grad.clone()
    assert lookup_part[0].abs().max() == 0, "the lookup must give the [PAD] row no gradient"
    params[word].grad += decoder.grad

    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    fx = {"in/images": images, "in/masked_images": masked, "in/input_ids": ids, "in/mlm_labels": mlm,
          "in/itm_labels": itm, "in/sup_cls_labels": sup, "in/sub_cls_labels": sub}
    for k, v in losses.items():
        fx[f"loss/{k}"] = f32(v)
    fx["loss/total_loss"] = f32(total)
    for k, p in params.items():
        fx[f"grad/{k}"] = f32(p.grad)
    fx[f"grad_part/lookup/{word}"] = f32(lookup_part)
    fx[f"grad_part/decoder/{word}"] = f32(decoder.grad)
    for k, v in buffers.items():
        fx[f"bn_after/{k}"] = f32(v)
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            fx[f"bn_after/{k}"] = (v + 1).contiguous()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt.step()
    for k, p in params.items():
        fx[f"param_after/{k}"] = f32(p)
    save_file({k: v.contiguous() for k, v in fx.items()}, a.out)
    print(f"wrote {a.out}: {len(params)} parameters; losses " + ", ".join(f"{k} {v.item():.6f}" for k, v in losses.items()) + f", total {total.item():.6f}")


if __name__ == "__main__":
    main()
