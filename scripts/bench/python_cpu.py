#!/usr/bin/env python3
"""mixc's Python operator against torch's own CPU attention, side by side:
the forward (`m(q, k, v)`) and forward + backward of a causal GQA layer on
CPU tensors, f32, interleaved rounds, median times. Measures what a PyTorch
user gets, binding overhead (copies in and out) included.

    python scripts/bench/python_cpu.py [--seqs 1024,4096] [--reps 5] [--threads N]

Needs `pip install ./python` (a release build) and torch.
"""
import argparse
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="1024,4096")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch and mixc threads (default: torch's)")
    a = p.parse_args()
    # Imported after the arguments, so `--help` works without torch.
    import torch
    import torch.nn.functional as F

    import mixc

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    h, kvh, d = a.heads, a.kv_heads, a.dim
    m = mixc.Mixer(f"mixer c {{ heads = {h}; kv_heads = {kvh}; head_dim = {d}; mask = causal; }}",
                   threads=threads)
    g = h // kvh

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1),
            v.transpose(1, 2).repeat_interleave(g, 1), is_causal=True).transpose(1, 2)

    print(f"torch {torch.__version__}, {threads} threads, causal GQA {h}/{kvh} heads, d={d}, batch 1, f32")
    print("| L | pass | mixc (s) | torch SDPA (s) | mixc / SDPA |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for L in [int(s) for s in a.seqs.split(",")]:
        q = torch.randn(1, L, h, d, requires_grad=True)
        k = torch.randn(1, L, kvh, d, requires_grad=True)
        v = torch.randn(1, L, kvh, d, requires_grad=True)
        do = torch.randn(1, L, h, d)
        for name, train in (("fwd", False), ("fwd+bwd", True)):
            times = {"mixc": [], "sdpa": []}
            for r in range(a.reps + 1):
                for who, fn in (("mixc", m), ("sdpa", sdpa)):
                    t0 = time.perf_counter()
                    if train:
                        o = fn(q, k, v)
                        torch.autograd.grad(o, (q, k, v), do)
                    else:
                        with torch.no_grad():
                            fn(q, k, v)
                    if r > 0:  # the first round warms up
                        times[who].append(time.perf_counter() - t0)
            mt, st = statistics.median(times["mixc"]), statistics.median(times["sdpa"])
            print(f"| {L} | {name} | {mt:.4f} | {st:.4f} | {mt / st:.2f} |")


if __name__ == "__main__":
    main()
