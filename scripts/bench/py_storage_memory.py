"""Peak RSS of one forward of the Python operator on bf16 tensors, read in
place (`inplace`) or widened to f32 first (`widened`: `Mixer(dtype="f32")`).

    python scripts/bench/py_storage_memory.py inplace [seq]
    python scripts/bench/py_storage_memory.py widened [seq]

Run each mode in its own process (the peak is the process's high-water mark).
"""
import argparse
import resource


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["inplace", "widened"])
    ap.add_argument("seq", nargs="?", type=int, default=16384)
    args = ap.parse_args()
    mode, seq = args.mode, args.seq
    import torch

    import mixc
    spec = "mixer c { heads = 8; head_dim = 128; mask = causal && window(256); }"
    q, k, v = (torch.randn(1, seq, 8, 128).bfloat16() for _ in range(3))
    m = mixc.Mixer(spec, dtype=None if mode == "inplace" else "f32")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        o = m(q, k, v)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{mode}: o {o.dtype}, inputs {3 * q.numel() * 2 / 2**20:.0f} MiB, "
          f"peak RSS above them {(peak - base) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
