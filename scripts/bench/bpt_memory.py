#!/usr/bin/env python3
"""Longest trainable sequence of one transformer block under a memory budget.

The Blockwise Parallel Transformer table (Liu & Abbeel 2023) on this machine's CPU.

The block is examples/blocks/gpt_bpt.mix: a pre-norm GPT block, width 1024,
16 causal softmax heads of 64 (scale 1/8), LayerNorm eps 1e-5 with weight and
bias, a tanh-GELU FFN of hidden 4096, no projection biases, no rotary:

    h = ln1(x); q, k, v = h Wq^T, h Wk^T, h Wv^T
    y = x + attention(q, k, v) Wo^T
    out = y + gelu_tanh(ln2(y) Wu^T) Wd^T

f32, batch 1. One training step is the forward, loss = (out * g).sum() for a
fixed random g, and the backward to x and every weight. Candidates:

- `vanilla`: PyTorch, attention materialised (scores = q k^T * scale,
  masked_fill(-inf) above the diagonal, softmax, @ v), full FFN;
- `sdpa`: PyTorch, F.scaled_dot_product_attention(is_causal=True) (the CPU
  flash / memory-efficient kernel), full FFN;
- `mixc`: `<mixc> run examples/blocks/gpt_bpt.mix --backend cpu --seq L
  --grad --json` (the blockwise block: attention of a query block, then its
  FFN, recomputed in the backward). The JSON object it prints must hold
  `forward_seconds` (or the older `seconds`) and `backward_seconds`; other
  fields are kept in --json's output. Skipped when the binary is missing.

Method. For each candidate, L doubles from --start (512) until an attempt
fails or passes --max-seq (32k by default, to bound the run time: reaching it
makes the longest L a lower bound); then --bisect steps (2) halve the
interval between the last success and the first out-of-memory failure, L a
multiple of 256 (when --start itself fails for memory, L halves down to 256
instead). When sdpa and mixc both have a longest L, the one without a
success at the smaller of the two is run there once more, so that their step
times compare at one L. Every attempt is a fresh process, so its peak memory
is its own, and fails if

- the kernel's memory limit stops it: a cgroup v2 memory.max (with
  memory.swap.max = 0) or, where only cgroup v1 has the memory controller, a
  v1 memory.limit_in_bytes (= memory.memsw.limit_in_bytes), in a new child
  cgroup of this process's own, one per attempt (or of the cgroup2 root);
  where no cgroup can be made, RLIMIT_AS set in the child's preexec_fn to the
  budget plus the candidate's non-resident virtual size (VmSize - VmRSS,
  sampled from /proc while an unconstrained attempt at L = 256 runs: torch
  maps ~3 GiB of address space, of which ~0.5 GiB is resident after import).
  The header says which one ran (--enforce forces one);
- or its peak RSS exceeds the budget, whatever the enforcement. The cgroup
  charges page cache and kernel memory but not the file pages (libraries)
  another cgroup loaded first, so the two differ: torch's ~0.25 GiB of
  library pages make the cgroup let it reach ~1.24 GiB of RSS at 1 GiB, and
  this check is the criterion. The peak RSS is the process's own VmHWM where
  it reports one (the torch child prints it; `mixc run --json` prints it as
  peak_rss_bytes), else (a killed attempt, or no such field) wait4's
  ru_maxrss, which is higher: it also counts the pages of this script that
  the spawn copies, and descendants - `import torch` vforks ldconfig, which
  adds ~0.1 GiB;
- or it runs past --timeout-s (reported as a timeout, not as out of memory,
  and the search stops there: the longest L is then a lower bound);
- or it exits non-zero for another reason (an error, with its stderr tail).

--budget-basis total (the default) charges the whole process: PyTorch is
~0.53 GiB resident right after `import torch` (the CUDA build's libraries and
its allocator), mixc ~4-19 MiB (the peak RSS of `mixc --version` from wait4,
so partly this script's pages). `above-baseline` charges only the growth
above each candidate's own baseline - closer to the paper, whose budget is
accelerator memory, which holds no library code. The summary table and
--json show both figures either way.

Torch runs with --threads threads (default: the cores this process may use;
OMP_NUM_THREADS too); mixc picks its own thread count (every core; the
script sets RAYON_NUM_THREADS for it as well). The step is timed once, no
warm-up (--reps N: the median of N steps in the one process). Prints the
date, machine, torch version and command line, a Markdown table of the
longest L per candidate (peak RSS and step time there, mixc's L over the
others'), a table of peak RSS (and step time) against L for every attempt,
and mixc / sdpa step time at the largest L both ran. Progress goes to stderr.

    .venv-bench/bin/python scripts/bench/bpt_memory.py --budget-gib 1

takes ~2 min for vanilla and sdpa on 2 cores (AMD EPYC), plus mixc's
attempts (up to L = 32k; a 600 s --timeout-s per attempt bounds them).
Long mode, hours on 2 cores (an sdpa step at L = 128k alone is estimated at
over an hour; raise --timeout-s so that it is not cut short):

    .venv-bench/bin/python scripts/bench/bpt_memory.py --budget-gib 16 --max-seq 512k --timeout-s 7200

Needs torch in the running python (e.g. .venv-bench/); run from anywhere.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPEC = "examples/blocks/gpt_bpt.mix"
WIDTH, HEADS, HEAD_DIM, HIDDEN, EPS = 1024, 16, 64, 4096, 1e-5
CANDIDATES = ("vanilla", "sdpa", "mixc")
GRAIN = 256  # every L is a multiple of this
EXIT_OOM = 3  # the torch child's exit status when an allocation fails
OOM_TEXT = re.compile(r"memory allocation of \d+ bytes failed|can't allocate memory|"
                      r"not enough memory|out of memory|MemoryError|Cannot allocate memory|"
                      r"std::bad_alloc|failed to allocate", re.I)


# ---------------------------------------------------------------- the child --

def own_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def status_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmSize", "VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    return out


def child(kind, L, threads, reps, seed):
    """One torch training step (or --reps of them) of the block at length L;
    prints one JSON object. Exit EXIT_OOM when an allocation fails."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    base = status_kib()
    if kind == "baseline":  # the resident set right after import: the library's own
        print(json.dumps({"torch_version": torch.__version__, "after_import_status_kib": base}))
        return 0
    g = torch.Generator().manual_seed(seed)

    def param(*shape, std=None, fill=None):
        t = torch.full(shape, fill) if fill is not None else torch.randn(*shape, generator=g) * std
        return t.requires_grad_(True)

    p = {"wq": param(WIDTH, WIDTH, std=0.02), "wk": param(WIDTH, WIDTH, std=0.02),
         "wv": param(WIDTH, WIDTH, std=0.02), "wo": param(WIDTH, WIDTH, std=0.02),
         "wu": param(HIDDEN, WIDTH, std=0.02), "wd": param(WIDTH, HIDDEN, std=0.02),
         "ln1_w": param(WIDTH, fill=1.0), "ln1_b": param(WIDTH, fill=0.0),
         "ln2_w": param(WIDTH, fill=1.0), "ln2_b": param(WIDTH, fill=0.0)}
    x = torch.randn(1, L, WIDTH, generator=g).requires_grad_(True)
    grad_out = torch.randn(1, L, WIDTH, generator=g)
    scale = HEAD_DIM ** -0.5

    def heads(t):  # [1, L, WIDTH] -> [1, HEADS, L, HEAD_DIM]
        return t.view(1, L, HEADS, HEAD_DIM).transpose(1, 2)

    def forward():
        h = F.layer_norm(x, (WIDTH,), p["ln1_w"], p["ln1_b"], EPS)
        q, k, v = (heads(F.linear(h, p[w])) for w in ("wq", "wk", "wv"))
        if kind == "vanilla":
            scores = (q @ k.transpose(-2, -1)) * scale
            above = torch.ones(L, L, dtype=torch.bool).triu(1)
            a = torch.softmax(scores.masked_fill(above, float("-inf")), dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        a = a.transpose(1, 2).reshape(1, L, WIDTH)
        y = x + F.linear(a, p["wo"])
        u = F.gelu(F.linear(F.layer_norm(y, (WIDTH,), p["ln2_w"], p["ln2_b"], EPS), p["wu"]),
                   approximate="tanh")
        return y + F.linear(u, p["wd"])

    fwd, bwd = [], []
    try:
        for _ in range(reps):
            x.grad = None
            for t in p.values():
                t.grad = None
            t0 = time.perf_counter()
            out = forward()
            loss = (out * grad_out).sum()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            del out, loss
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, MemoryError) or OOM_TEXT.search(str(e)):
            print(f"out of memory: {str(e).strip()[:300]}", file=sys.stderr)
            return EXIT_OOM
        raise
    if not (torch.isfinite(x.grad).all() and all(torch.isfinite(t.grad).all() for t in p.values())):
        print("error: non-finite gradient", file=sys.stderr)
        return 1
    print(json.dumps({
        "impl": f"torch.{kind}", "seq": L, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "reps": reps,
        "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
        "step_s": statistics.median(f + b for f, b in zip(fwd, bwd)),
        "forward_times_s": fwd, "backward_times_s": bwd,
        "after_import_status_kib": base, "end_status_kib": status_kib(),
    }))
    return 0


# ----------------------------------------------------------- enforcement --

def mounts(fstype):
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == fstype:
                yield parts[1], parts[3].split(",")


def own_cgroup(pred):
    """This process's cgroup path in the hierarchy whose controller list
    satisfies pred (v2: the '0::' line)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if pred(hid, ctrls.split(",")):
                return path
    return None


def read_int(path, key=None):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if key is None:
        return int(text.split()[0])
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return None


def write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


class Cgroup:
    """A parent directory under which each attempt gets a fresh child cgroup
    with the memory limit (v2 or v1 files)."""

    def __init__(self, version, parent):
        self.version, self.parent, self.n = version, parent, 0
        self.method = (f"cgroup v{version} memory limit "
                       + ("(memory.max, memory.swap.max = 0)" if version == 2 else
                          "(memory.limit_in_bytes = memory.memsw.limit_in_bytes)")
                       + f" in a fresh child cgroup of {parent} per attempt")

    def make(self, limit):
        self.n += 1
        d = os.path.join(self.parent, f"mixc-bpt-{os.getpid()}-{self.n}")
        os.mkdir(d)
        try:
            if self.version == 2:
                write(os.path.join(d, "memory.max"), limit)
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    write(os.path.join(d, "memory.swap.max"), 0)
            else:
                write(os.path.join(d, "memory.limit_in_bytes"), limit)
                if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
                    write(os.path.join(d, "memory.memsw.limit_in_bytes"), limit)
        except OSError:
            os.rmdir(d)
            raise
        return d

    def peak(self, d):
        return read_int(os.path.join(d, "memory.peak" if self.version == 2 else
                                     "memory.max_usage_in_bytes"))

    def oom_kills(self, d):
        if self.version == 2:
            return read_int(os.path.join(d, "memory.events"), "oom_kill") or 0
        return read_int(os.path.join(d, "memory.oom_control"), "oom_kill") or 0

    @staticmethod
    def remove(d):
        for _ in range(50):  # the last task may take a moment to leave
            try:
                os.rmdir(d)
                return
            except OSError:
                time.sleep(0.05)


def probe_cgroup(version):
    """A usable Cgroup of this version, or None (with the reason)."""
    if version == 2:
        parents = []
        own = own_cgroup(lambda hid, c: hid == "0")
        for mnt, _ in mounts("cgroup2"):
            if own is not None:
                parents.append(os.path.join(mnt, own.lstrip("/")))
            parents.append(mnt)
    else:
        parents = []
        own = own_cgroup(lambda hid, c: "memory" in c)
        for mnt, opts in mounts("cgroup"):
            if "memory" in opts and own is not None:
                parents.append(os.path.join(mnt, own.lstrip("/")))
    why = "no cgroup%s mount with the memory controller" % ("2" if version == 2 else " v1")
    for parent in dict.fromkeys(parents):
        cg = Cgroup(version, parent)
        try:
            d = cg.make(1 << 30)
        except OSError as e:
            why = f"{parent}: {e.strerror or e}"
            continue
        ok = os.path.exists(os.path.join(d, "memory.max" if version == 2 else "memory.limit_in_bytes"))
        Cgroup.remove(d)
        if ok:
            return cg, None
        why = f"{parent}: the memory controller is not enabled there"
    return None, why


# ------------------------------------------------------------- attempts --

def sample_status(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            d = {}
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmSize", "VmRSS"):
                    d[k] = int(v.split()[0]) * 1024
            return d
    except OSError:
        return None


def run_one(cmd, env, timeout_s, preexec=None, sample=False):
    """Run cmd; reap with wait4 for its own rusage. Returns a dict: rc (None
    when killed for the timeout), signal, stdout, stderr, peak_rss (bytes),
    wall_s, timed_out, and with sample the largest VmSize - VmRSS seen."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                preexec_fn=preexec)
        timed_out, gap, vmsize = False, 0, 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout_s:
                os.kill(proc.pid, signal.SIGKILL)
                _, status, ru = os.wait4(proc.pid, 0)
                timed_out = True
                break
            if sample:
                s = sample_status(proc.pid)
                if s and "VmSize" in s and "VmRSS" in s:
                    gap = max(gap, s["VmSize"] - s["VmRSS"])
                    vmsize = max(vmsize, s["VmSize"])
            time.sleep(0.002 if sample else 0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: keep Popen from waiting
        wall = time.monotonic() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    sig = -proc.returncode if proc.returncode < 0 else None
    return {"rc": proc.returncode, "signal": sig, "stdout": out, "stderr": err,
            "peak_rss": ru.ru_maxrss * 1024, "wall_s": wall, "timed_out": timed_out,
            "vm_gap": gap, "vm_size": vmsize}


class Runner:
    def __init__(self, args, enforcement, cgroup):
        self.a, self.enforcement, self.cg = args, enforcement, cgroup
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                    "RAYON_NUM_THREADS": str(args.threads)}
        self.baseline = {}  # candidate -> baseline peak RSS (bytes)
        self.vm_gap = {}  # candidate -> non-resident virtual bytes (rlimit only)

    def command(self, cand, L):
        if cand == "mixc":
            return [self.a.mixc, "run", SPEC, "--backend", "cpu", "--seq", str(L), "--grad", "--json"]
        return [sys.executable, os.path.abspath(__file__), "--child", cand, "--seq", str(L),
                "--threads", str(self.a.threads), "--reps", str(self.a.reps), "--seed", str(self.a.seed)]

    def measure_baseline(self, cand):
        """The candidate's resident set before any work: torch's VmRSS right
        after `import torch` (reported by the process itself), mixc's peak RSS
        over `mixc --version` (from wait4, so it includes up to this script's
        own RSS at the spawn: the fork's copy of the parent is counted)."""
        cmd = ([self.a.mixc, "--version"] if cand == "mixc" else self.command("baseline", 0))
        r = run_one(cmd, self.env, 300)
        if r["rc"] != 0:
            raise RuntimeError(f"{cand} baseline {shlex.join(cmd)}: exit {r['rc']}: {r['stderr'][-500:]}")
        if cand == "mixc":
            self.baseline[cand] = r["peak_rss"]
        else:
            j = json.loads(r["stdout"].strip().splitlines()[-1])
            self.baseline[cand] = j["after_import_status_kib"]["VmRSS"] * 1024
        if self.enforcement == "rlimit":
            # The non-resident part of the address space (code, reserved arenas and
            # stacks), sampled while a small real attempt runs unconstrained.
            cmd = self.command(cand, GRAIN)
            # A failed probe leaves a default; its attempts will report the failure.
            s = run_one(cmd, self.env, self.a.timeout_s, sample=True)
            self.vm_gap[cand] = (s["rc"] == 0 and s["vm_gap"]) or (512 << 20)

    def allowance(self, cand):
        """Bytes the candidate may hold: the budget, plus its baseline in the
        above-baseline basis."""
        extra = self.baseline[cand] if self.a.budget_basis == "above-baseline" else 0
        return self.a.budget + extra

    def attempt(self, cand, L):
        cmd = self.command(cand, L)
        allow = self.allowance(cand)
        d, preexec, limit = None, None, None
        if self.enforcement == "cgroup":
            limit = allow
            d = self.cg.make(limit)
            procs = os.path.join(d, "cgroup.procs")

            def preexec():
                write(procs, os.getpid())
        elif self.enforcement == "rlimit":
            import resource
            limit = allow + self.vm_gap[cand]

            def preexec():
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            r = run_one(cmd, self.env, self.a.timeout_s, preexec=preexec)
            cg_peak = self.cg.peak(d) if d else None
            cg_oom = self.cg.oom_kills(d) if d else 0
        finally:
            if d:
                Cgroup.remove(d)
        # Peak RSS: the process's own VmHWM where it reports one (the torch child
        # does, `mixc run --json` does as peak_rss_bytes), else wait4's ru_maxrss,
        # which also counts this script's pages copied into the fork before exec.
        rec = {"candidate": cand, "seq": L, "command": shlex.join(cmd), "limit_bytes": limit,
               "peak_rss_bytes": r["peak_rss"], "peak_rss_source": "wait4",
               "wait4_maxrss_bytes": r["peak_rss"], "baseline_bytes": self.baseline[cand],
               "cgroup_peak_bytes": cg_peak, "wall_s": r["wall_s"], "exit": r["rc"]}
        err_tail = r["stderr"].strip()[-600:]
        if r["timed_out"]:
            rec.update(status="timeout", detail=f"killed after {self.a.timeout_s:g} s")
        elif cg_oom or (r["rc"] == EXIT_OOM and cand != "mixc") or OOM_TEXT.search(r["stderr"]) \
                or (r["signal"] == signal.SIGKILL and self.enforcement == "cgroup"):
            rec.update(status="oom", detail=("killed by the cgroup OOM killer" if cg_oom else
                                             err_tail.splitlines()[-1] if err_tail else
                                             f"signal {r['signal']}"))
        elif r["rc"] != 0:
            rec.update(status="error", detail=f"exit {r['rc']}: {err_tail}")
        else:
            try:
                j = json.loads(r["stdout"].strip().splitlines()[-1])
                if cand == "mixc":
                    fwd = j.get("forward_seconds", j.get("seconds"))
                    bwd = j.get("backward_seconds")
                    if fwd is None or bwd is None:
                        raise KeyError("forward_seconds/backward_seconds")
                    rec.update(forward_s=float(fwd), backward_s=float(bwd),
                               step_s=float(fwd) + float(bwd), mixc_json=j)
                    own = j.get("peak_rss_bytes")
                else:
                    rec.update(forward_s=j["forward_s"], backward_s=j["backward_s"],
                               step_s=j["step_s"], torch=j)
                    own = j["end_status_kib"]["VmHWM"] * 1024
                    rec["baseline_bytes"] = j["after_import_status_kib"]["VmRSS"] * 1024
            except (ValueError, KeyError, IndexError, TypeError) as e:
                rec.update(status="error", detail=f"unreadable JSON ({e}): {r['stdout'][-300:]!r}")
                return self.finish(rec)
            if isinstance(own, (int, float)) and own > 0:
                rec.update(peak_rss_bytes=int(own), peak_rss_source="VmHWM")
            charged = rec["peak_rss_bytes"] - (rec["baseline_bytes"]
                                               if self.a.budget_basis == "above-baseline" else 0)
            if charged > self.a.budget:
                rec.update(status="over budget",
                           detail=f"peak RSS {fmt_bytes(rec['peak_rss_bytes'])}"
                                  + (f", {fmt_bytes(charged)} above baseline"
                                     if self.a.budget_basis == "above-baseline" else "")
                                  + f" > budget {fmt_bytes(self.a.budget)}")
            else:
                rec.update(status="ok")
        return self.finish(rec)

    @staticmethod
    def finish(rec):
        rec["peak_rss_above_baseline_bytes"] = rec["peak_rss_bytes"] - rec["baseline_bytes"]
        return rec


def search(runner, cand, log):
    a = runner.a
    attempts = []

    def go(L):
        r = runner.attempt(cand, L)
        attempts.append(r)
        extra = (f", {fmt_s(r['step_s'])}/step" if "step_s" in r else "")
        log(f"{cand:8s} L={L:6d}: {r['status']:11s} peak RSS {fmt_bytes(r['peak_rss_bytes'])}"
            f"{extra}, {r['wall_s']:.1f} s wall" + (f" ({r['detail'][:160]})" if r["status"] != "ok" else ""))
        return r

    memory_fail = ("oom", "over budget")
    best, fail = None, None
    L = a.start
    while L <= a.max_seq:
        r = go(L)
        if r["status"] != "ok":
            fail = r
            break
        best = r
        cap = a.max_seq // GRAIN * GRAIN
        L = 2 * L if 2 * L <= cap or L >= cap else cap  # the last step may land on --max-seq
    if best is None and fail is not None and fail["status"] in memory_fail:
        L = fail["seq"] // 2 // GRAIN * GRAIN
        while L >= GRAIN:  # the start itself too long: halve down
            r = go(L)
            if r["status"] == "ok":
                best = r
                break
            if r["status"] not in memory_fail:
                fail = r
                break
            fail = r
            L = L // 2 // GRAIN * GRAIN
    if best is not None and fail is not None and fail["status"] in memory_fail:
        lo, hi = best["seq"], fail["seq"]
        for _ in range(a.bisect):
            mid = (lo + hi) // 2 // GRAIN * GRAIN
            if mid <= lo or mid >= hi:
                break
            r = go(mid)
            if r["status"] == "ok":
                best, lo = r, mid
            elif r["status"] in memory_fail:
                fail, hi = r, mid
            else:
                fail = r
                break
    # Why the search stopped above the longest L.
    if fail is None:
        stop = f"--max-seq {a.max_seq} reached"
    else:
        stop = f"{fail['status']} at L={fail['seq']}"
    bound = fail is None or fail["status"] not in memory_fail
    return {"candidate": cand, "longest": best, "stopped_by": stop,
            "lower_bound": bound and best is not None, "attempts": attempts}


# -------------------------------------------------------------- output --

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
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
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_s(s):
    return "-" if s is None else (f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.0f} ms")


def parse_size(s):
    s = s.strip().lower()
    mult = 1024 if s.endswith("k") else 1
    return int(s[:-1] if s.endswith("k") else s) * mult


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-gib", type=float, default=1.0, help="memory budget per attempt (GiB)")
    p.add_argument("--budget-basis", choices=["total", "above-baseline"], default="total",
                   help="charge the whole peak RSS, or only its growth above the candidate's baseline")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help="comma-separated subset of " + ",".join(CANDIDATES))
    p.add_argument("--mixc", default="target/release/mixc", help="mixc binary (relative: to the current or the repository directory)")
    p.add_argument("--start", type=parse_size, default=512, help="first L (k = 1024)")
    p.add_argument("--max-seq", type=parse_size, default=32768,
                   help="never try an L above this (k = 1024; reaching it makes the longest L a lower bound)")
    p.add_argument("--bisect", type=int, default=2, help="bisection steps after the doubling")
    p.add_argument("--timeout-s", type=float, default=600, help="wall-clock limit of one attempt")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--reps", type=int, default=1, help="timed steps per torch attempt (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce", choices=["auto", "cgroup2", "cgroup1", "rlimit", "none"], default="auto",
                   help="how the kernel enforces the budget (auto: cgroup2, cgroup1, rlimit)")
    p.add_argument("--json", help="write every attempt and the summary here")
    p.add_argument("--child", choices=["vanilla", "sdpa", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a.child, a.seq, a.threads, a.reps, a.seed)

    a.budget = int(a.budget_gib * 2**30)
    cands = [c.strip() for c in a.candidates.split(",") if c.strip()]
    bad = [c for c in cands if c not in CANDIDATES]
    if bad or not cands:
        p.error(f"unknown candidate(s) {bad}; choose from {CANDIDATES}")
    if a.start % GRAIN or a.start < GRAIN or a.max_seq < a.start or a.threads < 1 or a.reps < 1 \
            or a.bisect < 0 or a.budget <= 0:
        p.error(f"--start must be a positive multiple of {GRAIN} at most --max-seq; "
                "--threads, --reps, --budget-gib positive")
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    if a.budget > 0.9 * avail:
        p.error(f"--budget-gib {a.budget_gib} is above 90% of the available memory "
                f"({fmt_bytes(avail)}): an attempt could take the machine down")
    mixc_path = a.mixc if os.path.isabs(a.mixc) or os.path.exists(a.mixc) else os.path.join(ROOT, a.mixc)
    mixc_path = os.path.abspath(mixc_path)
    skipped = {}
    if "mixc" in cands and not (os.path.isfile(mixc_path) and os.access(mixc_path, os.X_OK)):
        skipped["mixc"] = f"binary {a.mixc} not found (build it: cargo build --release)"
        cands.remove("mixc")
    a.mixc = mixc_path

    # Enforcement.
    cg, enforcement, notes = None, "none", []
    order = {"auto": ["cgroup2", "cgroup1", "rlimit"], "cgroup2": ["cgroup2"], "cgroup1": ["cgroup1"],
             "rlimit": ["rlimit"], "none": []}[a.enforce]
    for way in order:
        if way.startswith("cgroup"):
            if os.geteuid() != 0:
                notes.append(f"{way}: not root")
                continue
            cg, why = probe_cgroup(int(way[-1]))
            if cg:
                enforcement, method = "cgroup", cg.method
                break
            notes.append(f"{way}: {why}")
        else:
            enforcement = "rlimit"
            method = ("RLIMIT_AS in the child's preexec_fn = allowance + the candidate's non-resident "
                      "virtual size (VmSize - VmRSS, sampled at L=256)")
            break
    if enforcement == "none":
        method = "none (peak RSS checked after the fact only)"
        if a.enforce != "none":
            p.error("no way to enforce the budget: " + "; ".join(notes))

    torch_version = importlib.metadata.version("torch")  # the children import torch, not the parent

    runner = Runner(a, enforcement, cg)
    for c in list(cands):
        try:
            runner.measure_baseline(c)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            if c != "mixc":
                raise
            skipped["mixc"] = f"`{a.mixc} --version` failed: {e}"
            cands.remove(c)
    if enforcement == "rlimit":
        method += "; " + ", ".join(f"{c}: +{fmt_bytes(runner.vm_gap[c])}" for c in cands)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cmdline = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                          else sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT),
                          *(argv if argv is not None else sys.argv[1:])])
    mixc_version = (subprocess.run([a.mixc, "--version"], capture_output=True, text=True).stdout.strip()
                    if "mixc" in cands else None)
    header = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.platform()}",
        f"torch {torch_version}, {a.threads} threads; mixc: {mixc_version or 'not run'} ({a.mixc}); "
        f"repository at {git('rev-parse', '--short', 'HEAD')}"
        + (" (dirty tree)" if git("status", "--porcelain", "--untracked-files=no") else ""),
        f"command: {cmdline}",
        f"block: {SPEC}, width {WIDTH}, {HEADS} heads x {HEAD_DIM}, causal, FFN gelu_tanh {HIDDEN}, "
        f"f32, batch 1; one training step = forward + loss (out*g).sum() + backward to x and all weights",
        f"budget: {a.budget_gib:g} GiB per attempt, charged on the "
        + ("whole peak RSS" if a.budget_basis == "total" else "peak RSS above each candidate's baseline")
        + f"; enforcement: {method}"
        + (f" (tried: {'; '.join(notes)})" if notes else ""),
        "baselines: "
        + ", ".join(f"{c} {fmt_bytes(runner.baseline[c])}" for c in cands)
        + " (torch: VmRSS right after `import torch`; mixc: peak RSS of `mixc --version` from wait4)",
        "peak RSS: the process's own VmHWM (torch child; mixc's JSON peak_rss_bytes) where it reports "
        "one, else wait4's ru_maxrss (which also counts this script's own "
        f"{fmt_bytes(own_rss())} at the spawn, and torch's vfork of ldconfig at import: ~0.1 GiB more)",
        f"search: L from {a.start} doubling to {a.max_seq} at most, then {a.bisect} bisection steps "
        f"(multiples of {GRAIN}); timeout {a.timeout_s:g} s per attempt",
    ]
    # The header now (stdout), the progress on stderr, the tables at the end.
    print("\n".join(header))
    for c, why in skipped.items():
        print(f"SKIPPED {c}: {why}")
    print(flush=True)

    t_start = time.monotonic()
    results = {}
    try:
        for c in cands:
            results[c] = search(runner, c, log)
        # The step time comparison wants sdpa and mixc at one L, the largest
        # both can do: run the one that lacks it there (one extra attempt).
        if "sdpa" in results and "mixc" in results:
            ls = {c: results[c]["longest"]["seq"] for c in ("sdpa", "mixc") if results[c]["longest"]}
            if len(ls) == 2:
                L = min(ls.values())
                for c in ("sdpa", "mixc"):
                    if not any(x["seq"] == L and x["status"] == "ok" for x in results[c]["attempts"]):
                        x = runner.attempt(c, L)
                        x["extra"] = "for the step time comparison"
                        results[c]["attempts"].append(x)
                        log(f"{c:8s} L={L:6d}: {x['status']:11s} peak RSS {fmt_bytes(x['peak_rss_bytes'])}"
                            + (f", {fmt_s(x['step_s'])}/step" if "step_s" in x else "")
                            + " (extra, for the step time comparison)")
    except KeyboardInterrupt:
        log("interrupted: reporting the attempts so far")
    total_wall = time.monotonic() - t_start

    def longest(c):
        r = results.get(c)
        return r["longest"]["seq"] if r and r["longest"] else None

    def cell_L(c):
        r = results.get(c)
        if r is None:
            return "skipped" if c in skipped else "not run"
        if r["longest"] is None:
            return f"< {min(x['seq'] for x in r['attempts'])}"
        return (">= " if r["lower_bound"] else "") + str(r["longest"]["seq"])

    lines = ["| candidate | longest L | peak RSS at L | above baseline | step time at L (fwd + bwd) | "
             "stopped by | mixc L / this L |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    m = longest("mixc")
    for c in CANDIDATES:
        if c not in results and c not in skipped and c not in cands:
            continue
        r = results.get(c)
        b = r["longest"] if r else None
        ratio = "-"
        if c != "mixc" and m and longest(c):
            ratio = f"{m / longest(c):.1f}x" + (" (lower bound)" if results["mixc"]["lower_bound"] else "")
        lines.append("| {} | {} | {} | {} | {} | {} | {} |".format(
            c, cell_L(c), fmt_bytes(b["peak_rss_bytes"]) if b else "-",
            fmt_bytes(b["peak_rss_above_baseline_bytes"]) if b else "-",
            f"{fmt_s(b['step_s'])} ({fmt_s(b['forward_s'])} + {fmt_s(b['backward_s'])})" if b else "-",
            r["stopped_by"] if r else skipped.get(c, "-"), ratio))
    table1 = "\n".join(lines)

    seqs = sorted({x["seq"] for r in results.values() for x in r["attempts"]})
    shown = [c for c in CANDIDATES if c in results]
    lines = ["| L | " + " | ".join(shown) + " |", "| ---: |" + " ---: |" * len(shown)]
    for L in seqs:
        cells = []
        for c in shown:
            x = next((x for x in results[c]["attempts"] if x["seq"] == L), None)
            if x is None:
                cells.append("")
                continue
            s = f"{fmt_bytes(x['peak_rss_bytes'])}"
            if x["status"] == "ok":
                s += f", {fmt_s(x['step_s'])}"
            else:
                s += f" **{x['status']}**"
            cells.append(s)
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    table2 = "\n".join(lines)

    both = None
    if "sdpa" in results and "mixc" in results:
        ok = {c: {x["seq"]: x for x in results[c]["attempts"] if x["status"] == "ok"} for c in ("sdpa", "mixc")}
        common = sorted(set(ok["sdpa"]) & set(ok["mixc"]))
        if common:
            L = common[-1]
            both = {"seq": L, "mixc_step_s": ok["mixc"][L]["step_s"], "sdpa_step_s": ok["sdpa"][L]["step_s"],
                    "ratio": ok["mixc"][L]["step_s"] / ok["sdpa"][L]["step_s"]}
    if both:
        time_line = (f"time per training step at L = {both['seq']} (largest L all of (b) and (c) ran): "
                     f"mixc / sdpa = {both['ratio']:.3g} ({fmt_s(both['mixc_step_s'])} / "
                     f"{fmt_s(both['sdpa_step_s'])})")
    else:
        time_line = ("time per training step, mixc / sdpa: not available ("
                     + ("mixc skipped" if "mixc" in skipped else
                        "sdpa or mixc not among the candidates" if not ("sdpa" in results and "mixc" in results)
                        else "no L that both sdpa and mixc ran") + ")")

    print(table1)
    print()
    print("peak RSS (and step time) of every attempt:")
    print()
    print(table2)
    print()
    print(time_line)
    for x in (x for r in results.values() for x in r["attempts"] if x["status"] in ("error", "timeout")):
        print(f"{x['status']}: {x['candidate']} L={x['seq']}: {x['detail']}")
    print(f"search wall time: {total_wall:.0f} s")
    if a.json:
        doc = {"header": header, "budget_bytes": a.budget, "budget_basis": a.budget_basis,
               "enforcement": method, "enforcement_notes": notes, "baselines_bytes": runner.baseline,
               "skipped": skipped, "torch_version": torch_version, "threads": a.threads,
               "mixc_version": mixc_version, "mixc_commit": git("rev-parse", "HEAD"),
               "results": results, "mixc_vs_sdpa_time": both, "search_wall_s": total_wall,
               "ratios": {f"mixc/{c}": (m / longest(c)) if m and longest(c) else None
                          for c in ("vanilla", "sdpa")}}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    errors = [x for r in results.values() for x in r["attempts"] if x["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
