"""Hostile-load probe of `mvlt serve` and the weights readers (developer tooling, standard library only).

Measures what the trust issue's done-when asks for, on the micro PVLT: the server's peak resident
memory under 32 concurrent requests for 8000x8000 catalogue images and under 8 concurrent PNG
uploads whose iCCP chunk inflates to 5 GiB; its idle memory after start; /healthz latency, polled
from another loopback address throughout (also while one client holds 1000 idle sockets, 32
stalled uploads, and 8 requests of 120 texts of 64 KiB of punctuation); whether 4 MB POSTs sent
while every request slot is taken get their 503 or a broken pipe; and the peak memory of every
weights-reading command on a 222-byte pickle memo bomb.

  cargo build --release
  python3 scripts/hostile_probe.py --mvlt target/release/mvlt --json probe.json

It makes its own inputs under --work (a micro model trained for 2 steps, a catalogue of three
8000x8000 PNGs, the bombs) and prints a table; nothing is asserted here (tests/hostile.rs holds the
assertions), the figures are for the record.
"""
import argparse
import base64
import concurrent.futures as cf
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib


def png(width, height, rows, extra_chunks=()):
    """An 8-bit RGB PNG from an iterator of raw rows (filter byte added), with extra chunks after IHDR."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(b"\x00" + r) for r in rows) + z.flush()
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for kind, data in extra_chunks:
        out += chunk(kind, data)
    return out + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def big_image(side, seed):
    """side x side RGB with a pattern (so the file stays small; decoding still takes side^2*3 bytes)."""
    row = bytes(((x * 7 + seed * 31) // 16) & 255 for x in range(side * 3))
    return png(side, side, (row for _ in range(side)))


def iccp_bomb(inflated_gib):
    """A 2x1 PNG whose iCCP profile inflates to `inflated_gib` GiB of zeros."""
    z = zlib.compressobj(9)
    block = bytes(64 << 20)
    parts = [z.compress(block) for _ in range(inflated_gib * 16)]
    profile = b"".join(parts) + z.flush()
    return png(2, 1, [bytes([10, 20, 30, 40, 50, 60])], [(b"iCCP", b"icc\x00\x00" + profile)])


def memo_bomb():
    """The probe's 222-byte pickle: a list, then 9 levels of 10 memo references to the level below."""
    p = b"\x80\x02]q\x00"
    for level in range(1, 10):
        p += b"(" + bytes([ord("h"), level - 1]) * 10 + b"lq" + bytes([level])
    return p + b"."


def dict_memo_bomb():
    p = b"\x80\x02}q\x00"
    for level in range(1, 10):
        p += b"}("
        for k in range(10):
            p += b"X\x01\x00\x00\x00" + bytes([48 + k]) + b"h" + bytes([level - 1])
        p += b"uq" + bytes([level])
    return p + b"."


class Server:
    def __init__(self, mvlt, weights, catalog, extra=()):
        self.proc = subprocess.Popen(
            [mvlt, "serve", "--weights", weights, "--catalog", catalog, "--addr", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on http://"), line
        host, port = line.strip().removeprefix("listening on http://").split(":")
        self.host, self.port = host, int(port)

    def status(self, field):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def reset_peak(self):
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def request(port, method, path, body=None, headers=None, source="127.0.0.1", timeout=120):
    """One HTTP exchange from `source`: (status or error name, seconds)."""
    t0 = time.time()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status, time.time() - t0
    except Exception as e:  # the probe records what happened, whatever it was
        return type(e).__name__, time.time() - t0


class HealthWatch(threading.Thread):
    """Polls /healthz every 100 ms from 127.0.0.3; keeps the worst latency per phase."""
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.worst, self.failures, self.running = port, 0.0, 0, True

    def run(self):
        while self.running:
            st, secs = request(self.port, "GET", "/healthz", source="127.0.0.3", timeout=30)
            self.worst = max(self.worst, secs)
            self.failures += st != 200
            time.sleep(0.1)

    def take(self):
        w, f = self.worst, self.failures
        self.worst, self.failures = 0.0, 0
        return w, f


def counts(results):
    out = {}
    for st, _ in results:
        out[str(st)] = out.get(str(st), 0) + 1
    return out


def measured(cmd):
    """Run a command; (exit code, peak RSS MB, seconds, last line)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return p.returncode, usage.ru_maxrss / 1024, time.time() - t0, last[:160]


def weights_readers(mvlt, w):
    """Every weights-reading command on the memo bombs (a zip .pth, a bare pickle, a legacy stream
    whose object is the bomb), and `inspect` on files whose storages lie. Run first, while this
    process is small: a child's peak RSS (ru_maxrss) counts the memory it was forked with."""
    readers = []

    def run(fname, cname, cmd):
        code, peak, secs, last = measured(cmd)
        readers.append({"file": fname, "command": cname, "exit": code, "peak_rss_mb": round(peak), "seconds": round(secs, 2),
                        "message": last.replace(w, "WORK")})
        print(f"{fname}, {cname}: exit {code}, peak {peak:.0f} MB, {secs:.2f} s: {last}", file=sys.stderr)

    legacy_head = (b"\x80\x02\x8a\x0a" + bytes([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]) + b"."
                   + b"\x80\x02M\xe9\x03." + b"\x80\x02}X\x0d\x00\x00\x00little_endian\x88s.")
    bombs = {}
    for name, pkl in [("list memo bomb", memo_bomb()), ("dict memo bomb", dict_memo_bomb())]:
        stem = f"{w}/{name.replace(' ', '_')}"
        with zipfile.ZipFile(f"{stem}.pth", "w") as f:
            f.writestr("archive/data.pkl", pkl)
        bombs[f"{name} ({len(pkl)} bytes) as a zip .pth"] = f"{stem}.pth"
        open(f"{stem}_pickle.pth", "wb").write(pkl)
        bombs[f"{name} as a bare pickle"] = f"{stem}_pickle.pth"
        open(f"{stem}_legacy.pth", "wb").write(legacy_head + pkl + b"\x80\x02].")
        bombs[f"{name} as a legacy torch.save stream"] = f"{stem}_legacy.pth"
    synth = f"{w}/synth"
    commands = {
        "inspect": lambda p: [mvlt, "inspect", p],
        "convert": lambda p: [mvlt, "convert", p, f"{w}/converted.safetensors"],
        "serve": lambda p: [mvlt, "serve", "--weights", p, "--catalog", synth, "--config", "micro", "--addr", "127.0.0.1:0"],
        "finetune --init": lambda p: [mvlt, "finetune", "--recipe", "demo-finetune", "--out", f"{w}/ft", "--set",
                                      f"data={json.dumps(synth)}", "--init", p],
    }
    for fname, path in bombs.items():
        for cname, cmd in commands.items():
            run(fname, cname, cmd(path))

    # Storages that lie (items 3, 8 and 11 of the trust issue).
    def tensor_pickle(numel, n):
        return (b"\x80\x02ccollections\nOrderedDict\n)R(X\x16\x00\x00\x00patch_embed1.proj.bias"
                b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
                b"X\x03\x00\x00\x00cpu\x8a\x08" + struct.pack("<q", numel) + b"tQK\x00\x8a\x08" + struct.pack("<q", n)
                + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.")
    lying = {}

    def write_lying_files():
        with zipfile.ZipFile(f"{w}/inflating_storage.pth", "w", zipfile.ZIP_DEFLATED) as f:
            f.writestr("archive/data.pkl", tensor_pickle(4, 4))
            with f.open("archive/data/0", "w", force_zip64=True) as e:
                for _ in range(32):
                    e.write(bytes(64 << 20))
        with zipfile.ZipFile(f"{w}/inflating_pickle.pth", "w", zipfile.ZIP_DEFLATED) as f:
            with f.open("archive/data.pkl", "w", force_zip64=True) as e:
                e.write(b"\x80\x02N")
                for _ in range(32):
                    e.write(b"0" * (64 << 20))
        with zipfile.ZipFile(f"{w}/short_storage.pth", "w") as f:
            f.writestr("archive/data.pkl", tensor_pickle(50, 50))
            f.writestr("archive/data/0", struct.pack("<2f", 1.0, 2.0))
        for label, count in [("2^50", 1 << 50), ("-1", -1), ("2^61", 1 << 61)]:
            keys = b"\x80\x02(X\x01\x00\x00\x000l."
            body = legacy_head + tensor_pickle(4, 4) + keys + struct.pack("<q", count) + bytes(16)
            open(f"{w}/legacy_{label.replace('^', '_')}.pth", "wb").write(body)

    # Written by a forked child, so that this process stays small for the measurements.
    pid = os.fork()
    if pid == 0:
        write_lying_files()
        os._exit(0)
    os.waitpid(pid, 0)
    size = os.path.getsize(f"{w}/inflating_storage.pth") / 1e6
    lying[f"a {size:.1f} MB zip whose storage entry inflates to 2 GiB (a tensor of 4 values)"] = f"{w}/inflating_storage.pth"
    lying["a zip whose data.pkl inflates to 2 GiB"] = f"{w}/inflating_pickle.pth"
    lying["a zip whose storage holds 2 of its tensor's 50 values"] = f"{w}/short_storage.pth"
    for label in ["2^50", "-1", "2^61"]:
        lying[f"a legacy stream whose storage record claims {label} elements"] = f"{w}/legacy_{label.replace('^', '_')}.pth"
    for fname, path in lying.items():
        run(fname, "inspect", [mvlt, "inspect", path, "--config", "micro"])
    return readers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mvlt", default="target/release/mvlt")
    ap.add_argument("--work", default="runs/hostile-probe")
    ap.add_argument("--json")
    a = ap.parse_args()
    mvlt, w = os.path.abspath(a.mvlt), os.path.abspath(a.work)
    os.makedirs(w, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "mvlt": subprocess.run([mvlt, "--version"], capture_output=True, text=True).stdout.strip()}

    # The micro model, 2 steps on a small synthetic catalogue (the probe needs its shapes, not skill).
    weights = f"{w}/run/final/model.safetensors"
    if not os.path.exists(weights):
        subprocess.run([mvlt, "synth", "--out", f"{w}/synth", "--n", "64", "--size", "64"], check=True, capture_output=True)
        subprocess.run([mvlt, "pretrain", "--recipe", "demo", "--out", f"{w}/run", "--set", f"data={json.dumps(w + '/synth')}",
                        "--set", "max_steps=2", "--set", "val_fraction=0"], check=True, capture_output=True)
    results["weights_readers"] = weights_readers(mvlt, w)
    readers = results["weights_readers"]
    # Three 8000x8000 catalogue images.
    cat = f"{w}/big-catalogue"
    if not os.path.exists(f"{cat}/catalog.jsonl"):
        os.makedirs(f"{cat}/images", exist_ok=True)
        rows = []
        for i in range(3):
            open(f"{cat}/images/big{i}.png", "wb").write(big_image(8000, i))
            rows.append(json.dumps({"id": f"big{i}", "image": f"images/big{i}.png", "caption": "a red cotton shirt",
                                    "category": "TOPS", "subcategory": "SHIRTS", "product_id": str(i)}))
        open(f"{cat}/catalog.jsonl", "w").write("\n".join(rows) + "\n")
        subprocess.run(["cp", f"{w}/run/final/vocab.txt", f"{cat}/vocab.txt"], check=True)

    print("starting the server on the catalogue of three 8000x8000 images ...", file=sys.stderr)
    t0 = time.time()
    s = Server(mvlt, weights, cat)
    time.sleep(1.0)
    results["server_start_s"] = round(time.time() - t0, 1)
    results["idle_rss_mb"] = round(s.status("VmRSS") / 1e6)
    health = HealthWatch(s.port)
    health.start()
    phases = []

    def phase(name, fn):
        s.reset_peak()
        t = time.time()
        detail = fn()
        time.sleep(0.3)
        worst, failures = health.take()
        phases.append({"phase": name, "detail": detail, "seconds": round(time.time() - t, 1),
                       "peak_rss_mb": round(s.status("VmHWM") / 1e6), "healthz_worst_s": round(worst, 3),
                       "healthz_failures": failures})
        print(f"{name}: {detail} | peak {phases[-1]['peak_rss_mb']} MB | /healthz worst {worst:.3f} s", file=sys.stderr)

    with cf.ThreadPoolExecutor(64) as pool:
        phase("32 concurrent GET /v1/images/{row} (8000x8000 files)",
              lambda: counts(pool.map(lambda i: request(s.port, "GET", f"/v1/images/{i % 3}"), range(32))))

        bomb = iccp_bomb(5)
        body = json.dumps({"image": base64.b64encode(bomb).decode(), "text": "a shirt"}).encode()
        results["iccp_request_mb"] = round(len(body) / 1e6, 2)
        phase(f"8 concurrent /v1/score with a {len(body) / 1e6:.1f} MB PNG whose iCCP inflates to 5 GiB",
              lambda: counts(pool.map(lambda _: request(s.port, "POST", "/v1/score", body, {"Content-Type": "application/json"}), range(8))))

        small = base64.b64encode(png(2, 1, [bytes([10, 20, 30, 40, 50, 60])])).decode()
        texts = json.dumps({"image": small, "texts": ["!.,;" * (16 << 10)] * 120}).encode()
        phase("8 concurrent /v1/score with 120 texts of 64 KiB of punctuation",
              lambda: counts(pool.map(lambda _: request(s.port, "POST", "/v1/score", texts, {"Content-Type": "application/json"}), range(8))))

        def idle_sockets():
            socks, refused = [], 0
            for _ in range(1000):
                c = socket.socket()
                c.bind(("127.0.0.2", 0))
                c.settimeout(5)
                try:
                    c.connect(("127.0.0.1", s.port))
                    socks.append(c)
                except OSError:
                    refused += 1
            time.sleep(3)
            answered_503 = 0
            for c in socks:
                c.settimeout(0.01)
                try:
                    answered_503 += c.recv(64).startswith(b"HTTP/1.1 503")
                except OSError:
                    pass
                c.close()
            return {"sockets": len(socks), "answered 503 and closed": answered_503, "connect failed": refused}
        phase("one client (127.0.0.2) opens 1000 idle sockets for 3 s", idle_sockets)

        def stalled():
            head = b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"text\":"
            socks = []
            for _ in range(32):
                c = socket.socket()
                c.bind(("127.0.0.2", 0))
                c.connect(("127.0.0.1", s.port))
                c.sendall(head)
                socks.append(c)
            time.sleep(0.5)
            other = request(s.port, "POST", "/v1/score", json.dumps({"image": small, "text": "a shirt"}).encode(),
                            {"Content-Type": "application/json"}, source="127.0.0.3")
            answers = {}
            for c in socks:
                c.settimeout(40)
                try:
                    st = c.recv(64).split(b" ")[1].decode()
                except (OSError, IndexError):
                    st = "no answer"
                answers[st] = answers.get(st, 0) + 1
                c.close()
            return {"another client's POST meanwhile": f"{other[0]} in {other[1]:.2f} s", "stalled uploads got": answers}
        phase("one client sends 32 POSTs whose bodies stall", stalled)

        four_mb = json.dumps({"image": small, "text": "a" * (4 << 20)}).encode()
        phase("500 POSTs of 4 MB at concurrency 64 from one address",
              lambda: counts(pool.map(lambda _: request(s.port, "POST", "/v1/score", four_mb, {"Content-Type": "application/json"}), range(500))))

    health.running = False
    results["server_phases"] = phases
    s.stop()

    print("\n| server phase | outcome | peak RSS | worst /healthz |\n|---|---|---|---|")
    print(f"| idle after start (3 catalogue images of 8000x8000) | started in {results['server_start_s']} s | {results['idle_rss_mb']} MB | |")
    for p in phases:
        print(f"| {p['phase']} | {json.dumps(p['detail'])} | {p['peak_rss_mb']} MB | {p['healthz_worst_s']} s ({p['healthz_failures']} failed) |")
    print("\n| weights file | command | exit | peak RSS | seconds | message |\n|---|---|---|---|---|---|")
    for r in readers:
        print(f"| {r['file']} | {r['command']} | {r['exit']} | {r['peak_rss_mb']} MB | {r['seconds']} | {r['message']} |")
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
