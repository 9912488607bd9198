"""An independent, minimal PyTorch PVLT forward (eval mode) with the reference's state-dict names.

Used to compare speed with `mvlt bench` on the same machine. It is checked against the reference
fixture (small_io) before it is timed, so the timing is of a correct model.

  python3 scripts/torch_pvlt.py FIXTURE_DIR   -> parity on small_io, then timings of pvlt_tiny
"""
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def bn(x, sd, p, train=False):
    # In training, F.batch_norm normalises with the batch statistics (biased variance) and updates
    # the running buffers in place with the unbiased variance, as nn.BatchNorm2d does.
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], train, 0.1, 1e-5)


def convbn(x, sd, p, train=False):
    return bn(F.conv2d(x, sd[p + ".0.weight"], None, padding=1), sd, p + ".1", train)


def up(x, f):
    return F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=True)


def forward(sd, cfg, images, ids, heads, train=False, mlm_rows=None):
    """Dropout and drop_path are never applied (rates 0); `train` switches BatchNorm to batch statistics.
    `mlm_rows` (indices into the B*T text positions) decodes MLM there only, as mvlt does; the
    authors' code decodes every position."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)
    # nn.Embedding(vocab, hidden, padding_idx=pad_token_id=0) (MVLT-SPEC 2.1): the lookup passes no
    # gradient to the [PAD] row; the tied decoder below still does.
    y = F.embedding(ids, sd["text_embeddings.word_embeddings.weight"], padding_idx=0) + F.embedding(pos, sd["text_embeddings.position_embeddings.weight"])[None] + sd["text_embeddings.token_type_embeddings.weight"][0]
    y = ln(y, sd, "text_embeddings.LayerNorm", 1e-12)
    x = images
    feats = []
    grid0 = cfg["img_size"] // cfg["patch_size"]
    for i in range(4):
        s = i + 1
        stride = cfg["patch_size"] if i == 0 else 2
        x = F.conv2d(x, sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"], stride=stride)
        _, C, H, W = x.shape
        x = ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{s}.norm", 1e-5)
        table = sd[f"pos_embed{s}"]
        if i == 3:
            table = table[:, 1:]
        g = grid0 >> i
        if (H, W) != (g, g):
            table = F.interpolate(table.reshape(1, g, g, C).permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False).reshape(1, C, H * W).permute(0, 2, 1)
        x = x + table
        y = ln(lin(y, sd, f"text_embed{s}.0"), sd, f"text_embed{s}.1", 1e-5) + sd[f"text_pos_embed{s}"]
        z = torch.cat([x, y], 1)
        heads_n, sr = cfg["num_heads"][i], cfg["sr_ratios"][i]
        d = 0
        while f"block{s}.{d}.norm1.weight" in sd:
            p = f"block{s}.{d}"
            h = ln(z, sd, p + ".norm1", 1e-6)
            N = h.shape[1]
            q = lin(h, sd, p + ".attn.q").reshape(B, N, heads_n, C // heads_n).permute(0, 2, 1, 3)
            if sr > 1:
                img = h[:, : H * W].transpose(1, 2).reshape(B, C, H, W)
                img = F.conv2d(img, sd[p + ".attn.sr.weight"], sd[p + ".attn.sr.bias"], stride=sr).reshape(B, C, -1).transpose(1, 2)
                kv_src = torch.cat([ln(img, sd, p + ".attn.norm", 1e-5), h[:, H * W:]], 1)
            else:
                kv_src = h
            kv = lin(kv_src, sd, p + ".attn.kv").reshape(B, -1, 2, heads_n, C // heads_n).permute(2, 0, 3, 1, 4)
            attn = (q @ kv[0].transpose(-2, -1)) * (C // heads_n) ** -0.5
            o = (attn.softmax(-1) @ kv[1]).transpose(1, 2).reshape(B, N, C)
            z = z + lin(o, sd, p + ".attn.proj")
            h = ln(z, sd, p + ".norm2", 1e-6)
            z = z + lin(F.gelu(lin(h, sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
            d += 1
        x = z[:, : H * W].transpose(1, 2).reshape(B, C, H, W)
        y = z[:, H * W:]
        feats.append(x)
    out = {"text_feats.3": y, "img_feats.3": feats[3]}
    cls = y[:, 0:1]
    if "itm" in heads:
        e = ln(lin(cls, sd, "itm_head_embed.0"), sd, "itm_head_embed.1", 1e-5)
        out["itm_logits"] = lin(e, sd, "itm_head.linear") + sd["itm_head.linear_bias"]
    if "mlm" in heads:
        src = y if mlm_rows is None else y.reshape(-1, y.shape[-1])[mlm_rows]
        e = ln(lin(src, sd, "mlm_head_embed.0"), sd, "mlm_head_embed.1", 1e-5)
        hid = ln(F.gelu(lin(e, sd, "mlm_head.transform.dense")), sd, "mlm_head.transform.LayerNorm", 1e-5)
        # The decoder weight IS the word-embedding matrix (tied); a caller may pass it under its own
        # key to see the two uses' gradients apart.
        dec = sd.get("mlm_head.mlm_decoder.weight", sd["text_embeddings.word_embeddings.weight"])
        out["mlm_logits"] = hid @ dec.t() + sd["mlm_head.bias"]
    if "t2i" in heads:
        f2, f3, f4 = feats[1], feats[2], feats[3]
        t = "t2i_head."
        cb = lambda x, name: convbn(x, sd, t + name, train)  # noqa: E731
        r1, r2, r3 = cb(f2, "reduction1"), cb(f3, "reduction2"), cb(f4, "reduction3")
        x2_1 = cb(up(r3, 2), "conv_upsample1") * r2
        x3_1 = cb(up(r2, 2), "conv_upsample2") * cb(up(x2_1, 2), "conv_upsample3") * r1
        x2_2 = cb(torch.cat([x2_1, cb(up(r3, 2), "conv_upsample4")], 1), "conv_concat2")
        x3_2 = cb(torch.cat([x3_1, cb(up(x2_2, 2), "conv_upsample5")], 1), "conv_concat3")
        out["t2i_logits"] = up(F.conv2d(cb(x3_2, "conv4"), sd[t + "score.0.weight"], sd[t + "score.0.bias"]), 8)
    if "cls" in heads:
        for k in ("sup_cls", "sub_cls"):
            e = ln(lin(cls, sd, f"{k}_head_embed.0"), sd, f"{k}_head_embed.1", 1e-5)
            out[f"{k}_logits"] = lin(e, sd, f"{k}_head.linear") + sd[f"{k}_head.linear_bias"]
    return out


TINY = {"embed_dims": [64, 128, 320, 512], "num_heads": [1, 2, 5, 8], "mlp_ratios": [8, 8, 4, 4], "sr_ratios": [8, 4, 2, 1],
        "depths": [2, 2, 2, 2], "hidden": 768, "vocab": 30522, "T": 128, "n_sup": 48, "n_sub": 122, "t2i_channel": 64,
        "img_size": 224, "patch_size": 4}


def random_weights(spec, device, seed=0):
    """Random weights with the reference's state-dict names and shapes for `spec` (see TINY)."""
    g = torch.Generator().manual_seed(seed)
    dims, ratios, srs, depths = spec["embed_dims"], spec["mlp_ratios"], spec["sr_ratios"], spec["depths"]
    sd = {}

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(device)

    def small(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(device)

    H, V, T = spec["hidden"], spec["vocab"], spec["T"]
    sd["text_embeddings.word_embeddings.weight"] = r(V, H)
    sd["text_embeddings.position_embeddings.weight"] = r(512, H)
    sd["text_embeddings.token_type_embeddings.weight"] = r(2, H)

    def L(p, i, o):
        sd[p + ".weight"], sd[p + ".bias"] = r(o, i), small(o)

    def N(p, c):
        sd[p + ".weight"], sd[p + ".bias"] = 1 + small(c), small(c)

    N("text_embeddings.LayerNorm", H)
    prev, prev_t = 3, H
    grid0 = spec["img_size"] // spec["patch_size"]
    for i in range(4):
        s, C = i + 1, dims[i]
        k = spec["patch_size"] if i == 0 else 2
        sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"] = r(C, prev, k, k), small(C)
        N(f"patch_embed{s}.norm", C)
        g_ = grid0 >> i
        sd[f"pos_embed{s}"] = r(1, g_ * g_ + (1 if i == 3 else 0), C)
        sd[f"text_pos_embed{s}"] = r(1, T, C)
        L(f"text_embed{s}.0", prev_t, C)
        N(f"text_embed{s}.1", C)
        for d in range(depths[i]):
            p = f"block{s}.{d}"
            N(p + ".norm1", C); N(p + ".norm2", C)
            L(p + ".attn.q", C, C); L(p + ".attn.kv", C, 2 * C); L(p + ".attn.proj", C, C)
            if srs[i] > 1:
                sd[p + ".attn.sr.weight"], sd[p + ".attn.sr.bias"] = r(C, C, srs[i], srs[i]), small(C)
                N(p + ".attn.norm", C)
            L(p + ".mlp.fc1", C, C * ratios[i]); L(p + ".mlp.fc2", C * ratios[i], C)
        prev, prev_t = C, C
    for h in ("itm", "mlm", "sup_cls", "sub_cls"):
        L(f"{h}_head_embed.0", dims[3], H); N(f"{h}_head_embed.1", H)
    L("itm_head.linear", H, 2); sd["itm_head.linear_bias"] = small(2)
    L("sup_cls_head.linear", H, spec["n_sup"]); sd["sup_cls_head.linear_bias"] = small(spec["n_sup"])
    L("sub_cls_head.linear", H, spec["n_sub"]); sd["sub_cls_head.linear_bias"] = small(spec["n_sub"])
    L("mlm_head.transform.dense", H, H); N("mlm_head.transform.LayerNorm", H); sd["mlm_head.bias"] = small(V)
    c = spec["t2i_channel"]
    for name, (i, o) in {"reduction1": (dims[1], c), "reduction2": (dims[2], c), "reduction3": (dims[3], c), "conv_upsample1": (c, c), "conv_upsample2": (c, c), "conv_upsample3": (c, c), "conv_upsample4": (c, c), "conv_upsample5": (2 * c, 2 * c), "conv_concat2": (2 * c, 2 * c), "conv_concat3": (3 * c, 3 * c), "conv4": (3 * c, 3 * c)}.items():
        p = "t2i_head." + name
        sd[p + ".0.weight"] = (torch.randn(o, i, 3, 3, generator=g) * (2.0 / (9 * i)) ** 0.5).to(device)
        N(p + ".1", o)
        sd[p + ".1.running_mean"] = small(o)
        sd[p + ".1.running_var"] = (0.5 + torch.rand(o, generator=g)).to(device)
        sd[p + ".1.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    sd["t2i_head.score.0.weight"], sd["t2i_head.score.0.bias"] = r(3, 3 * c, 1, 1), small(3)
    cfg = {"img_size": spec["img_size"], "patch_size": spec["patch_size"], "num_heads": spec["num_heads"], "sr_ratios": srs}
    return sd, cfg


def random_tiny(device):
    """pvlt_tiny shapes with random weights (timing only)."""
    return random_weights(TINY, device)


def parity_check(fix):
    """Run this implementation on the reference's small_io fixture (float64) and fail if it is off."""
    meta = json.load(open(f"{fix}/small_io.json"))["config"]
    cfg = {"img_size": meta["img_size_for_pos_embed"], "patch_size": meta["patch_size"], "num_heads": meta["num_heads"], "sr_ratios": meta["sr_ratios"]}
    sd = {k: v.double() for k, v in load_file(f"{fix}/small_model.safetensors").items()}
    io = load_file(f"{fix}/small_io.safetensors")
    with torch.no_grad():
        out = forward(sd, cfg, io["images"].double(), io["input_ids"], {"itm", "mlm", "t2i", "cls"})
    worst = 0.0
    for k in ("itm_logits", "sup_cls_logits", "sub_cls_logits", "t2i_logits", "text_feats.3", "img_feats.3"):
        worst = max(worst, (out[k].float() - io[k]).abs().max().item())
    print(f"torch_pvlt parity vs small_io (float64 CPU): max abs error {worst:.2e}")
    assert worst < 1e-4, "the PyTorch comparison model is wrong; not using it"


def main():
    fix = sys.argv[1]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    parity_check(fix)

    sd, cfg = random_tiny(dev)
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        for heads in (("itm",), ("itm", "mlm", "t2i", "cls")):
            for batch in (8, 64):
                images = torch.rand(batch, 3, 256, 256, device=dev)
                ids = torch.randint(1000, 30000, (batch, 128), device=dev)
                with torch.no_grad():
                    for _ in range(3):
                        forward(sd, cfg, images, ids, set(heads))
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    times = []
                    for _ in range(10):
                        t0 = time.perf_counter()
                        forward(sd, cfg, images, ids, set(heads))
                        if dev == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                times.sort()
                m = times[len(times) // 2]
                print(f"torch forward pvlt_tiny 256x256 batch {batch} heads [{','.join(heads)}] on {dev} tf32={tf32}: median {m * 1e3:.1f} ms ({batch / m:.1f} images/s)")


if __name__ == "__main__":
    main()
