"""Peak memory of one rank of a ring over torch.distributed (gloo, one
machine) against the same forward in one process: each rank should hold
about its share of q, k, v and o, not the whole sequence's.

    python scripts/bench/ring_memory.py --seq 16384 --world 2

Spawns `world` rank processes and one single-process run; each builds
only the tensors it holds (a rank: its shards; the single run: the whole
sequence), runs the causal GQA forward (32 heads, 8 kv heads, d 128, f32,
batch 1), and reports its peak RSS above its own baseline (the RSS after
importing torch and mixc and building the mixer)."""

import argparse
import os
import resource
import subprocess
import sys
import tempfile

SPEC = "mixer ring_mem { heads = 32; kv_heads = 8; head_dim = 128; dtype = f32; mask = causal; }"


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rank, world, init, seq):
    import torch
    import torch.distributed as dist

    import mixc

    m = mixc.Mixer(SPEC, threads=1)
    base = rss_mib()
    if world > 0:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        n = sum(b - a for a, b in mixc.ring_shards(seq, world, "zigzag")[rank])
    else:
        n = seq
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, n, 32, 128, generator=g)
    k = torch.randn(1, n, 8, 128, generator=g)
    v = torch.randn(1, n, 8, 128, generator=g)
    held = sum(t.numel() * 4 for t in (q, k, v)) / 2**20 + n * 32 * 128 * 4 / 2**20
    with torch.no_grad():
        o = m(q, k, v, group=dist.group.WORLD) if world > 0 else m(q, k, v)
    assert o.shape == (1, n, 32, 128)
    who = f"rank {rank} of {world}" if world > 0 else "one process"
    print(f"{who}: {n} positions, q/k/v/o {held:.0f} MiB, peak RSS above baseline {peak_mib() - base:.0f} MiB")
    if world > 0:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank is not None:
        worker(a.rank, a.world, a.init, a.seq)
        return
    me = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        procs = [subprocess.Popen([sys.executable, me, "--seq", str(a.seq), "--world", str(a.world), "--rank", str(r),
                                   "--init", init]) for r in range(a.world)]
        codes = [p.wait() for p in procs]
    subprocess.run([sys.executable, me, "--seq", str(a.seq), "--world", "0", "--rank", "0"], check=True)
    if any(codes):
        sys.exit(1)


if __name__ == "__main__":
    main()
