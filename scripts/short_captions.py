"""Rewrite a synthetic catalogue's captions to "<colour> <garment>." (the garment as one word), with a
vocabulary of just those words: a matching task small enough for ITM to be learned in a CPU run.

  mvlt synth --out runs/cat64 --n 800 --size 64
  python3 scripts/short_captions.py runs/cat64 runs/short
  mvlt pretrain --data runs/short --out runs/itm --set max_len=6 --set batch_size=128 \
      --set base_lr=1.2e-3 --set warmup_epochs=0.1 --set epochs=300 --set max_steps=1000 --set val_every=100

The vocabulary lists the words in the order scripts/grounding_experiment.py numbers them, so weights
of such a run load into that script (--init-from) with the same token ids.
"""
import json
import os
import re
import sys

COLOURS = ["black", "white", "navy", "red", "burgundy", "green", "olive", "beige", "brown", "grey", "pink", "yellow", "blue", "orange", "purple"]
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "."]


def vocabulary(subcategories):
    """Token ids of both scripts: specials, colours, then one word per sub-category (sorted)."""
    return SPECIALS + COLOURS + list(subcategories)


def caption_colour(caption):
    """The first colour word of a synthetic caption."""
    return next(w for w in re.findall(r"[a-z]+", caption.lower()) if w in COLOURS)


def one_word(subcategory):
    """'BOMBER JACKETS' -> 'bomberjackets'."""
    return re.sub(r"[^a-z]", "", subcategory.lower())


def main(src, dst):
    rows = [json.loads(line) for line in open(os.path.join(src, "catalog.jsonl"))]
    subs = sorted({r["subcategory"] for r in rows})
    os.makedirs(dst, exist_ok=True)
    images = os.path.join(dst, "images")
    if not os.path.exists(images):
        os.symlink(os.path.abspath(os.path.join(src, "images")), images)
    vocab = vocabulary(one_word(s) for s in subs) + ["[UNK]"]
    with open(os.path.join(dst, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(dst, "catalog.jsonl"), "w") as f:
        for r in rows:
            r["caption"] = f"{caption_colour(r['caption'])} {one_word(r['subcategory'])}."
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} rows, {len(vocab)} words -> {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
