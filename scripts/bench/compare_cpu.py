#!/usr/bin/env python3
"""mixc's CPU backend vs PyTorch's CPU scaled_dot_product_attention.

Same shape for both: causal softmax attention, f32, batch 1, --heads heads
(no GQA), head dim --head-dim; mixc runs examples/causal_gqa_llama3.mix with
`--set heads=H --set kv_heads=H --set head_dim=D`. Every (implementation, L)
runs in its own process; its peak resident memory is read from wait4(), the
same way for both. Prints one markdown table with mixc/PyTorch ratios and
writes the full results as JSON. Standard library only: torch is used only
inside the worker (scripts/bench/torch_cpu_sdpa.py) run by --torch-python.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPEC = "examples/causal_gqa_llama3.mix"


def run_child(cmd, cwd):
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Drain the pipes before reaping (a child blocked on a full pipe would never
    # exit), then reap with wait4, which returns this child's own rusage.
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return proc.returncode, out, err, rusage.ru_maxrss * 1024, wall


def parse_seq(s):
    s = s.strip().lower()
    mult = 1024 if s.endswith("k") else 1
    n = int(s[:-1] if s.endswith("k") else s) * mult
    if n < 1:
        raise argparse.ArgumentTypeError(f"bad sequence length {s!r}")
    return n


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def fmt_bytes(b):
    if b is None:
        return "-"
    return f"{b / 2**20:.1f} MiB" if b < 10 * 2**20 else f"{b / 2**20:.0f} MiB"


def fmt_s(s):
    return "-" if s is None else (f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixc", required=True, help="path of the mixc binary (release build)")
    p.add_argument("--torch-python", help="python with torch; omit to skip PyTorch (reported as not run)")
    p.add_argument("--seq", default="1k,4k,16k", help="comma-separated lengths (k = 1024)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for PyTorch (mixc uses every core)")
    p.add_argument("--pass", dest="pass_", choices=["fwd", "bwd", "fwdbwd"], default="fwd",
                   help="time the forward, the backward alone, or both")
    p.add_argument("--dtype", default="f32,bf16", help="storage types, comma-separated (f32, bf16)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds over all points; each point's time is the median over rounds")
    p.add_argument("--matmul", type=int, default=4096, metavar="N",
                   help="also time PyTorch's N x N GEMM per dtype (0: skip)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--markdown", help="write the table (markdown) here")
    args = p.parse_args(argv)
    seqs = [parse_seq(s) for s in args.seq.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in ("f32", "bf16") for d in dtypes) or args.rounds < 1:
        p.error("--dtype takes f32 and/or bf16; --rounds at least 1")

    failures = []
    torch_version = None
    # The limit: mixc's own tile products on in-cache tiles, and PyTorch's GEMM.
    peak_cmd = [args.mixc, "bench", "--peak", "--json"]
    rc, out, err, _, _ = run_child(peak_cmd, ROOT)
    peak = json.loads(out) if rc == 0 else None
    if peak is None:
        failures.append(f"mixc bench --peak: exit {rc}: {err.strip()[-500:]}")
    torch_matmul = {}
    if args.torch_python and args.matmul:
        for dt in dtypes:
            cmd = [args.torch_python, os.path.join(HERE, "torch_cpu_sdpa.py"), "--matmul", str(args.matmul),
                   "--dtype", dt, "--reps", "3", "--threads", str(args.threads)]
            rc, out, err, _, _ = run_child(cmd, ROOT)
            if rc == 0:
                torch_matmul[dt] = json.loads(out)["gflops"]
            else:
                failures.append(f"torch matmul {dt}: exit {rc}: {err.strip()[-500:]}")

    points = [(L, dt) for L in seqs for dt in dtypes]
    got = {pt: {"mixc": [], "torch": []} for pt in points}
    # Interleaved rounds: every point once per round, so a slow spell of the
    # (shared) machine lands on all points alike; medians over rounds.
    for rnd in range(args.rounds):
        for (L, dt) in points:
            mixc_cmd = [args.mixc, "bench", SPEC, "--backend", "cpu", "--dtype", dt,
                        "--seq", str(L), "--batch", str(args.batch),
                        "--set", f"heads={args.heads}", "--set", f"kv_heads={args.heads}",
                        "--set", f"head_dim={args.head_dim}",
                        "--reps", str(args.reps), "--warmup", str(args.warmup),
                        "--pass", args.pass_, "--json"]
            rc, out, err, rss, wall = run_child(mixc_cmd, ROOT)
            if rc != 0:
                failures.append(f"mixc L={L} {dt}: exit {rc}: {err.strip()[-500:]}")
            else:
                r = json.loads(out)["rows"][0]
                got[(L, dt)]["mixc"].append({
                    "median_s": r["median_s"], "min_s": r["min_s"], "max_s": r["max_s"],
                    "times_s": r["times_s"], "useful_tflops": r["useful_tflops"],
                    "peak_rss_bytes": rss, "input_bytes": r["input_bytes"],
                    "output_bytes": r["output_bytes"], "command": shlex.join(mixc_cmd),
                    # A `mixc tune` cache entry would change the tiles: say which ran.
                    "config": r.get("config"), "config_source": r.get("config_source"),
                    "wall_s": wall})
            m = got[(L, dt)]["mixc"]
            print(f"round {rnd + 1} mixc  L={L} {dt}: {fmt_s(m[-1]['median_s'] if m else None)}, "
                  f"peak RSS {fmt_bytes(rss)}", file=sys.stderr)
            if args.torch_python:
                t_cmd = [args.torch_python, os.path.join(HERE, "torch_cpu_sdpa.py"), "--seq", str(L),
                         "--batch", str(args.batch), "--heads", str(args.heads),
                         "--head-dim", str(args.head_dim), "--reps", str(args.reps),
                         "--warmup", str(args.warmup), "--threads", str(args.threads),
                         "--pass", args.pass_, "--dtype", dt]
                rc, out, err, rss, wall = run_child(t_cmd, ROOT)
                if rc != 0:
                    failures.append(f"torch L={L} {dt}: exit {rc}: {err.strip()[-500:]}")
                else:
                    t = json.loads(out)
                    torch_version = t["torch_version"]
                    t.update({"peak_rss_bytes": rss, "wall_s": wall, "command": shlex.join(t_cmd)})
                    got[(L, dt)]["torch"].append(t)
                tt = got[(L, dt)]["torch"]
                print(f"round {rnd + 1} torch L={L} {dt}: {fmt_s(tt[-1]['median_s'] if tt else None)}, "
                      f"peak RSS {fmt_bytes(rss)}", file=sys.stderr)

    def summary(runs):
        """The median over rounds of each process's median, the largest peak RSS."""
        if not runs:
            return {}
        out = dict(runs[len(runs) // 2])
        out["median_s"] = statistics.median(r["median_s"] for r in runs)
        out["rounds_s"] = [r["median_s"] for r in runs]
        out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
        return out

    rows = []
    for (L, dt) in points:
        row = {"seq": L, "dtype": dt, "mixc": summary(got[(L, dt)]["mixc"])}
        if args.torch_python:
            row["torch"] = summary(got[(L, dt)]["torch"])
        m = row["mixc"]
        if "median_s" in m:
            # Useful FLOPs are fixed by the shape: rescale one process's rate.
            r0 = got[(L, dt)]["mixc"][0]
            useful_flops = r0["useful_tflops"] * 1e12 * r0["median_s"]
            row["mixc_gflops"] = useful_flops / m["median_s"] / 1e9
            limit = peak and (peak.get("bf16_gflops") if dt == "bf16" else None) or (peak or {}).get("f32_gflops")
            if limit:
                row["limit_gflops"] = limit
                row["limit_fraction"] = row["mixc_gflops"] / limit
        # Ratios: mixc / PyTorch, so < 1 means mixc is faster / smaller.
        t = row.get("torch", {})
        if "median_s" in m and "median_s" in t:
            row["time_ratio"] = m["median_s"] / t["median_s"]
            row["rss_ratio"] = m["peak_rss_bytes"] / t["peak_rss_bytes"]
            # Above the library's own footprint: the part that grows with L.
            if t.get("baseline_rss_bytes"):
                row["torch_rss_above_baseline_bytes"] = t["peak_rss_bytes"] - t["baseline_rss_bytes"]
        rows.append(row)

    header = ("| L | dtype | mixc time | PyTorch time | time ratio (mixc/PyTorch) | mixc useful GFLOP/s | "
              "of mixc's kernel limit | mixc peak RSS | PyTorch peak RSS (after-import baseline) | RSS ratio |")
    lines = [header, "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        m, t = row.get("mixc", {}), row.get("torch", {})
        torch_rss = "not run" if not args.torch_python else (
            f"{fmt_bytes(t.get('peak_rss_bytes'))} ({fmt_bytes(t.get('baseline_rss_bytes'))})"
            if "median_s" in t else "error")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            row["seq"], row["dtype"], fmt_s(m.get("median_s")),
            fmt_s(t.get("median_s")) if args.torch_python else "not run",
            f"{row['time_ratio']:.2f}" if "time_ratio" in row else "-",
            f"{row['mixc_gflops']:.0f}" if "mixc_gflops" in row else "-",
            f"{100 * row['limit_fraction']:.0f}%" if "limit_fraction" in row else "-",
            fmt_bytes(m.get("peak_rss_bytes")), torch_rss,
            f"{row['rss_ratio']:.2f}" if "rss_ratio" in row else "-"))
    table = "\n".join(lines)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "shape": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                  "mask": "causal", "dtypes": dtypes, "spec": SPEC},
        "limit": {"mixc_kernels": peak, "torch_matmul_gflops": torch_matmul},
        "pass": args.pass_,
        "mixc_commit": git("rev-parse", "HEAD"),
        "mixc_tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "mixc_version": subprocess.run([args.mixc, "--version"], capture_output=True, text=True).stdout.strip(),
        "torch_version": torch_version, "torch_threads": args.threads,
        "reps": args.reps, "warmup": args.warmup, "rounds": args.rounds,
        "rows": rows, "failures": failures,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print(f"causal attention ({args.pass_}), {'/'.join(dtypes)}, batch {args.batch}, {args.heads} heads, "
          f"d={args.head_dim}, {args.rounds} interleaved round(s); "
          f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores; torch {torch_version or 'not run'}")
    if peak:
        bf = peak.get("bf16_gflops")
        print(f"limit: mixc's f32 tile product {peak['f32_gflops']:.0f} GFLOP/s ({peak['isa']}), "
              f"bf16 {f'{bf:.0f} GFLOP/s' if bf else 'not on this CPU'}; PyTorch GEMM "
              + (", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in torch_matmul.items()) or "not run"))
    print(table)
    if not args.torch_python:
        print("NOT EXERCISED: PyTorch (no --torch-python): only mixc was timed", file=sys.stderr)
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
