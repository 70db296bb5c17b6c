#!/usr/bin/env python3
"""One PyTorch CPU timing point, run in its own process so that its peak
memory is its own: causal scaled_dot_product_attention, f32 or bf16
(`--dtype`); the forward
(`--pass fwd`), the backward through autograd alone (`bwd`: the forward of
each repetition is untimed) or both (`fwdbwd`).

Prints one JSON object: median/min/max seconds over --reps timed calls (after
--warmup untimed ones), the resident memory right after `import torch`
(the library's own footprint) and the torch version. The parent measures the
process's peak RSS with wait4(), the same way as for mixc.

`--matmul N` times a large `N x N` matrix product in `--dtype` instead
(PyTorch's GEMM rate: the machine's practical limit as oneDNN/MKL reach it)
and prints its GFLOP/s.
"""
import argparse
import json
import resource
import statistics
import sys
import time


def rss_now_bytes():
    # Current resident set (VmRSS); ru_maxrss would be the peak so far.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=0, help="sequence length L (required unless --matmul)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pass", dest="pass_", choices=["fwd", "bwd", "fwdbwd"], default="fwd")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--matmul", type=int, default=0, metavar="N",
                   help="time an N x N matrix product instead of attention")
    args = p.parse_args(argv)
    if args.matmul < 0 or min(args.seq or args.matmul, args.batch, args.heads, args.head_dim, args.reps) < 1 \
            or args.warmup < 0:
        p.error("sizes and --reps must be at least 1, --warmup at least 0")

    import torch  # imported late so that --help works without torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = rss_now_bytes()
    g = torch.Generator().manual_seed(args.seed)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.matmul:
        n = args.matmul
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        times = []
        for i in range(args.warmup + args.reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        print(json.dumps({"impl": "torch.matmul", "dtype": args.dtype, "n": n,
                          "threads": torch.get_num_threads(), "torch_version": torch.__version__,
                          "gflops": 2 * n ** 3 / min(times) / 1e9}))
        return 0
    # [batch, heads, seq, head_dim]: SDPA's layout.
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) for _ in range(3))
    times = []
    if args.pass_ == "fwd":
        with torch.inference_mode():
            for i in range(args.warmup + args.reps):
                t0 = time.perf_counter()
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times.append(dt)
                if not torch.isfinite(out.float()).all():
                    print("error: non-finite output", file=sys.stderr)
                    return 1
                del out
    else:
        for t in (q, k, v):
            t.requires_grad_(True)
        d_o = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        for i in range(args.warmup + args.reps):
            q.grad = k.grad = v.grad = None
            t0 = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            t1 = time.perf_counter()
            out.backward(d_o)
            t2 = time.perf_counter()
            if i >= args.warmup:
                times.append(t2 - t1 if args.pass_ == "bwd" else t2 - t0)
            if not all(torch.isfinite(t.grad.float()).all() for t in (q, k, v)):
                print("error: non-finite gradient", file=sys.stderr)
                return 1
            del out
    print(json.dumps({
        "impl": "torch.sdpa",
        "pass": args.pass_,
        "dtype": args.dtype,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "seq": args.seq, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "reps": len(times),
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
        "times_s": times,
        "baseline_rss_bytes": baseline,
        "self_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
