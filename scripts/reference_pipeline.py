"""The reference MVLT image pipeline in PIL + numpy, for `mvlt data bench --reference-python`.

rgb_loader(if_crop=True): PIL open -> convert('1') (Floyd-Steinberg) -> box of the black pixels
(right/bottom exclusive, as the reference) -> crop -> convert('RGB'); then torchvision's
Resize((S, S)) (PIL bilinear, antialiased) and ToTensor (CHW float32 / 255).
Reads image paths (one per line) on stdin; prints {"images": n, "seconds": s} as JSON.
Single process, single thread: a per-core figure.
"""
import json
import sys
import time

import numpy as np
from PIL import Image


def rgb_loader(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    black = ~np.asarray(img.convert("1"))
    ys, xs = np.nonzero(black)
    if len(xs):
        img = img.crop((xs.min(), ys.min(), xs.max(), ys.max()))
    return img.convert("RGB")


def main():
    size = int(sys.argv[1])
    paths = [line.strip() for line in sys.stdin if line.strip()]
    t0 = time.perf_counter()
    for p in paths:
        img = rgb_loader(p).resize((size, size), Image.BILINEAR)
        tensor = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        assert tensor.shape == (3, size, size)
    print(json.dumps({"images": len(paths), "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
