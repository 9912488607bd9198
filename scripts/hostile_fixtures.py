"""Crafted weight files for tests/hostile.rs (written to tests/data/hostile/).

oversized_tensor.pth: a torch.save zip whose one tensor claims shape (1_000_000_000,) of float32
(4 GB) over a 4-element storage. torch.save cannot write such a file, so the pickle is patched:
the size tuple `K\\x04\\x85` (BININT1 4, TUPLE1) becomes `J<1e9 as int32>\\x85`.

  python3 scripts/hostile_fixtures.py
"""
import io
import zipfile

import torch


def oversized_tensor():
    buf = io.BytesIO()
    torch.save({"patch_embed1.proj.bias": torch.arange(4, dtype=torch.float32)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                old = b"K\x00K\x04\x85"  # storage offset 0, size (4,)
                assert data.count(old) == 1
                data = data.replace(old, b"K\x00J\x00\xca\x9a\x3b\x85")
            dst.writestr(info.filename, data)
    return out.getvalue()


if __name__ == "__main__":
    open("tests/data/hostile/oversized_tensor.pth", "wb").write(oversized_tensor())
