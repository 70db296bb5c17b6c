#!/usr/bin/env python3
"""One decode step on the CPU: mixc against PyTorch's scaled_dot_product_attention
and against the machine's own memory bandwidth, in one run.

A decode step reads the whole KV cache once for a few flops per byte, so its
figure of merit is the rate at which it reads K and V. This script measures,
interleaved over rounds (the machine is shared) and reported as medians:

- the machine's read bandwidth (`torch.sum` over a 1 GiB tensor, a
  STREAM-like read) and copy bandwidth (`copy_`, bytes read + written);
- PyTorch CPU SDPA on the step (q [b, heads, n, d], K/V [b, kv_heads, L, d],
  `enable_gqa=True`, the queries the last n positions: a bottom-right causal
  boolean mask when n > 1);
- `mixc bench --decode n` (the library's CPU backend, in-process repetitions).

    python scripts/bench/decode_cpu.py [--kv 131072] [--queries 1] [--heads 32]
        [--kv-heads 8] [--dim 128] [--rounds 3] [--mixc target/release/mixc]

Defaults: Llama-3 8B's attention (32 query heads, 8 kv heads, d 128), one
token against a 128k-token cache, f32. Needs torch (e.g. .venv-bench/).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", type=int, default=131072, help="KV cache length")
    p.add_argument("--queries", type=int, default=1, help="new tokens per step")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed steps per round")
    p.add_argument("--mixc", default="target/release/mixc")
    a = p.parse_args()
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    h, kvh, d, n, L = a.heads, a.kv_heads, a.dim, a.queries, a.kv
    kv_bytes = 2 * L * kvh * d * 4

    big = torch.ones(1 << 28)  # 1 GiB of f32
    dst = torch.empty_like(big)
    q = torch.randn(1, h, n, d)
    k = torch.randn(1, kvh, L, d)
    v = torch.randn(1, kvh, L, d)
    mask = None
    if n > 1:
        i = torch.arange(n).view(n, 1) + (L - n)
        mask = torch.arange(L).view(1, L) <= i

    def timed(f, reps):
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    spec = (f"mixer decode {{ heads = {h}; kv_heads = {kvh}; head_dim = {d}; dtype = f32; "
            f"mask = causal; }}")
    with tempfile.NamedTemporaryFile("w", suffix=".mix", delete=False) as f:
        f.write(spec)
        spec_path = f.name
    cmd = [a.mixc, "bench", spec_path, "--backend", "cpu", "--seq", str(L), "--decode", str(n),
           "--reps", str(a.reps), "--json"]
    rounds = {"read": [], "copy": [], "sdpa": [], "mixc": []}
    try:
        for _ in range(a.rounds):
            rounds["read"].append(big.numel() * 4 / timed(lambda: big.sum(), a.reps))
            rounds["copy"].append(2 * big.numel() * 4 / timed(lambda: dst.copy_(big), a.reps))
            rounds["sdpa"].append(timed(lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=True), a.reps))
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
            row = json.loads(out.stdout)["rows"][0]
            rounds["mixc"].append(row["median_s"])
    finally:
        os.unlink(spec_path)
    read, copy = statistics.median(rounds["read"]), statistics.median(rounds["copy"])
    sdpa, mixc = statistics.median(rounds["sdpa"]), statistics.median(rounds["mixc"])
    print(f"decode step: {n} token(s) x {L} cached, {h} heads / {kvh} kv heads, d {d}, "
          f"f32, {threads} threads, {a.rounds} interleaved rounds of {a.reps}; "
          f"K/V = {kv_bytes / 2**30:.2f} GiB")
    print(f"machine: read {read / 1e9:.1f} GB/s (torch.sum), copy {copy / 1e9:.1f} GB/s (copy_)")
    print("| | step | tokens/s | K/V read GB/s | of read bandwidth | time vs SDPA |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in (("mixc", mixc), ("torch SDPA", sdpa)):
        bw = kv_bytes / t
        print(f"| {name} | {t * 1e3:.1f} ms | {n / t:.1f} | {bw / 1e9:.1f} | {bw / read:.0%} | "
              f"{t / sdpa:.2f} |")


if __name__ == "__main__":
    main()
