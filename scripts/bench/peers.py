#!/usr/bin/env python3
"""mixc against its peers on one GPU, in one run (issue 7).

Sections (--sections, default all):
  sdpa     causal and full softmax attention vs torch SDPA with the
           FlashAttention and the cuDNN backend; bf16, d in --dims, L in --seqs,
           batch = max(1, --tokens / L), heads = 2048 / d (batch*heads fill the GPU)
  flex     sliding window, ALiBi, softcap (+ window) and document masking vs
           torch.compile'd flex_attention (block masks built once per shape,
           outside the timing); the document ids and q/k/v are written to a
           safetensors file that mixc reads too, so both run on the same data
  linear   retention (examples/retention_retnet.mix) vs a PyTorch chunkwise
           implementation (checked against a quadratic form first)
  ring     R = 1 vs 2, 4, 8 virtual ranks, causal, L = --ring-seq
  longest  longest causal L on one GPU, doubling from --longest-start until out
           of memory or a run takes over --longest-cap-s, mixc vs SDPA (flash)
  tune     `mixc tune` on three specs, tuned vs default speedup

Timing: torch with CUDA events around each call, L2 flushed (a 256 MiB buffer
zeroed) before each repetition, after warm-up; the median of --reps. mixc: the
median `median_s` of `mixc bench --json` (same warm-up and repetitions).
Ratios are mixc / peer: below 1 means mixc is faster.

--dry-run prints the grid and the mixc commands without running anything
(no torch needed). --smoke runs the mixc side only on tiny shapes with
--backend cpu, for CI on a machine without a GPU, and prints what it did not
exercise. --self-test checks the chunkwise reference against the quadratic
form on the CPU (needs torch, no GPU).
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SECTIONS = ["sdpa", "flex", "bwd", "linear", "ring", "longest", "tune"]

# Specs mixc runs for each case; shapes are set with `mixc bench --set`.
SPECS = {
    "full": "examples/full_attention.mix",
    "causal": "examples/causal_gqa_llama3.mix",
    "sliding_window": "examples/sliding_window_mistral.mix",
    "alibi": "examples/alibi_bloom.mix",
    "softcap": "examples/softcap_window_gemma2.mix",
    "document": "examples/document_mask.mix",
    "retention": "examples/retention_retnet.mix",
}
WINDOW = 4096  # window(4096) in sliding_window_mistral and softcap_window_gemma2
SOFTCAP = 50.0  # transform = 50.0 * tanh(s / 50.0) in softcap_window_gemma2
RETENTION_SCALE = 0.125  # scale = 0.125 in retention_retnet
TUNE_CASES = [("causal", 8192), ("sliding_window", 16384), ("retention", 16384)]


def parse_len(s):
    s = s.strip().lower()
    if s.endswith("k"):
        return int(s[:-1]) * 1024
    if s.endswith("m"):
        return int(s[:-1]) * 1024 * 1024
    return int(s)


def parse_list(s, conv=parse_len):
    out = [conv(x.strip()) for x in s.split(",") if x.strip()]
    if not out or (conv is not str and min(out) < 1):
        raise argparse.ArgumentTypeError(f"bad list {s!r}")
    return out


def alibi_slopes(heads):
    """mixc's alibi_slope(h, heads) (dsl/src/ir.rs): geometric for powers of
    two; extra heads take every other slope of the next power of two."""
    closest = 1 << (heads.bit_length() - 1)
    base = lambda k: 2.0 ** (-8.0 / k)
    return [base(closest) ** (h + 1) if h < closest else base(2 * closest) ** (2 * (h - closest) + 1)
            for h in range(heads)]


def retention_gammas(heads):
    # decay = 1.0 - pow(2.0, -5.0 - h) in retention_retnet
    return [1.0 - 2.0 ** (-5.0 - h) for h in range(heads)]


class Runner:
    def __init__(self, args):
        self.args = args
        self.rows = []  # one per compared case
        self.errors = []
        self.not_exercised = []
        self.notes = []
        self.workdir = tempfile.mkdtemp(prefix="mixc-peers-")
        self.cache_dir = os.path.join(self.workdir, "cache")
        self.torch = None
        self.flush_buf = None

    # ---------- mixc ----------
    def mixc_cmd(self, spec, *, seq=None, batch=1, sets=(), inputs=None, ranks=1, reps=None,
                 warmup=None, dtype=None):
        a = self.args
        cmd = [a.mixc, "bench", spec, "--backend", a.backend, "--json",
               "--reps", str(reps or a.reps), "--warmup", str(a.warmup if warmup is None else warmup),
               "--ranks", str(ranks), "--dtype", dtype or a.dtype]
        cmd += ["--inputs", inputs] if inputs else ["--seq", str(seq), "--batch", str(batch)]
        for s in sets:
            cmd += ["--set", s]
        return cmd

    def run_mixc(self, cmd, what):
        """Runs a mixc command; returns its first bench row, or None and records why."""
        if self.args.dry_run:
            print("  " + shlex.join(cmd))
            return None
        env = dict(os.environ, MIXC_CACHE_DIR=os.environ.get("MIXC_CACHE_DIR", self.cache_dir))
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                               timeout=self.args.point_timeout)
        except subprocess.TimeoutExpired:
            msg = f"timed out after {self.args.point_timeout:.0f} s"
            self.errors.append(f"{what}: mixc {msg}")
            return {"error": msg, "command": shlex.join(cmd)}
        if p.returncode != 0:
            msg = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
            self.errors.append(f"{what}: mixc exit {p.returncode}: {msg}")
            return {"error": msg, "command": shlex.join(cmd)}
        doc = json.loads(p.stdout)
        row = doc["rows"][0] if "rows" in doc else doc
        row["command"] = shlex.join(cmd)
        return row

    # ---------- torch ----------
    def need_torch(self, what):
        """True when torch on a GPU can run `what`; otherwise records it as not exercised."""
        if self.args.dry_run or self.args.smoke:
            self.not_exercised.append(f"{what}: PyTorch peer ({'dry run' if self.args.dry_run else 'smoke: no GPU'})")
            return False
        if self.torch is None:
            import torch  # only here: --dry-run, --smoke and --help work without torch
            if not torch.cuda.is_available():
                raise SystemExit("peers.py: torch sees no GPU (use --smoke on a machine without one)")
            self.torch = torch
            # Each (mask, shape) compiles its own flex kernel: dozens in one run.
            # Past dynamo's default limit of 8, calls would silently fall back
            # to eager flex_attention (unfused, quadratic memory).
            for name in ("cache_size_limit", "recompile_limit"):  # renamed in newer torch
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 1024)
            if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
                torch._dynamo.config.accumulated_cache_size_limit = 4096
            # Larger than the 50-60 MB L2 of an H100/H200: zeroing it evicts the inputs.
            self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        return True

    def cuda_time(self, fn, reps=None, warmup=None):
        torch = self.torch
        reps = reps or self.args.reps
        for _ in range(self.args.warmup if warmup is None else warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            self.flush_buf.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), times

    def qkv(self, batch, heads, seq, dim, kv_heads=None, dv=None, seed=0):
        torch = self.torch
        g = torch.Generator(device="cuda").manual_seed(seed)
        kvh = kv_heads or heads
        mk = lambda h, d: torch.randn(batch, h, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        return mk(heads, dim), mk(kvh, dim), mk(kvh, dv or dim)

    def add(self, section, case, mixc_row, peer, peer_s, peer_times=None, note=""):
        m = mixc_row or {}
        mixc_s = m.get("median_s")
        pairs = m.get("useful_pairs")
        row = {
            "section": section, "case": case, "peer": peer,
            "mixc_s": mixc_s, "peer_s": peer_s,
            "ratio": (mixc_s / peer_s) if (mixc_s and peer_s) else None,
            "mixc_tflops": m.get("useful_tflops"),
            "peer_tflops": None, "mixc": m, "peer_times_s": peer_times, "note": note,
        }
        if pairs and peer_s and m.get("head_dim"):
            # The backward does 2.5 forwards' FLOPs (as mixc counts them).
            passes = 2.5 if section == "bwd" else 1.0
            row["peer_tflops"] = passes * pairs * (2 * m["head_dim"] + 2 * m["value_dim"]) / peer_s / 1e12
        self.rows.append(row)
        return row

    def grid_shape(self, seq, dim):
        heads = max(1, self.args.head_budget // dim)
        batch = max(1, self.args.tokens // seq)
        return batch, heads

    # ---------- sections ----------
    def sdpa(self):
        a = self.args
        for dim in a.dims:
            for kind in ("causal", "full"):
                for seq in a.seqs:
                    batch, heads = self.grid_shape(seq, dim)
                    case = f"{kind} d={dim} L={seq} B={batch} H={heads}"
                    sets = [f"heads={heads}", f"kv_heads={heads}", f"head_dim={dim}", f"value_dim={dim}"]
                    print(f"[sdpa] {case}", file=sys.stderr)
                    m = self.run_mixc(self.mixc_cmd(SPECS[kind], seq=seq, batch=batch, sets=sets), f"sdpa {case}")
                    if not self.need_torch(f"sdpa {case}"):
                        self.add("sdpa", case, m, "sdpa", None)
                        continue
                    torch = self.torch
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    import torch.nn.functional as F
                    q, k, v = self.qkv(batch, heads, seq, dim)
                    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                          ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                        try:
                            with sdpa_kernel(backend):
                                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=(kind == "causal"))
                                med, times = self.cuda_time(fn)
                            self.add("sdpa", case, m, name, med, times)
                        except Exception as e:  # a backend may not support a shape: record, go on
                            self.errors.append(f"sdpa {case} {name}: {type(e).__name__}: {e}")
                            self.add("sdpa", case, m, name, None, note=f"{type(e).__name__}")
                    q = k = v = None  # free the GPU memory before the next shape
                    torch.cuda.empty_cache()

    def bwd(self):
        """The backward pass alone (dq, dk, dv from a saved forward): mixc
        `bench --pass bwd` (kernel time) vs SDPA's FlashAttention backward and
        FlexAttention's backward, causal and full, same shapes."""
        a = self.args
        flex_attention = create_block_mask = None
        for dim in a.dims:
            for kind in ("causal", "full"):
                for seq in a.seqs:
                    batch, heads = self.grid_shape(seq, dim)
                    case = f"{kind} d={dim} L={seq} B={batch} H={heads}"
                    sets = [f"heads={heads}", f"kv_heads={heads}", f"head_dim={dim}", f"value_dim={dim}"]
                    print(f"[bwd] {case}", file=sys.stderr)
                    cmd = self.mixc_cmd(SPECS[kind], seq=seq, batch=batch, sets=sets) + ["--pass", "bwd"]
                    m = self.run_mixc(cmd, f"bwd {case}")
                    if not self.need_torch(f"bwd {case}"):
                        self.add("bwd", case, m, "sdpa-flash bwd", None)
                        continue
                    torch = self.torch
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    import torch.nn.functional as F
                    q, k, v = (t.requires_grad_() for t in self.qkv(batch, heads, seq, dim))
                    causal = kind == "causal"
                    try:
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            do = torch.randn_like(o)
                            fn = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                            med, times = self.cuda_time(fn)
                        self.add("bwd", case, m, "sdpa-flash bwd", med, times)
                    except Exception as e:
                        self.errors.append(f"bwd {case} sdpa: {type(e).__name__}: {e}")
                        self.add("bwd", case, m, "sdpa-flash bwd", None, note=type(e).__name__)
                    try:
                        if flex_attention is None:
                            from torch.nn.attention.flex_attention import flex_attention as fa, create_block_mask
                            flex_attention = torch.compile(fa, dynamic=False)
                        mask = (lambda b, h, qi, ki: qi >= ki) if causal else (lambda b, h, qi, ki: qi >= 0)
                        bm = create_block_mask(mask, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device="cuda")
                        o = flex_attention(q, k, v, block_mask=bm)
                        do = torch.randn_like(o)
                        fn = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                        med, times = self.cuda_time(fn)
                        self.add("bwd", case, m, "flex bwd", med, times)
                    except Exception as e:
                        self.errors.append(f"bwd {case} flex: {type(e).__name__}: {e}")
                        self.add("bwd", case, m, "flex bwd", None, note=type(e).__name__)
                    q = k = v = o = do = None
                    torch.cuda.empty_cache()

    def flex_mods(self, variant, heads, doc=None):
        """(score_mod, mask_mod) for flex_attention, mirroring the mixc spec."""
        torch = self.torch
        causal = lambda b, h, qi, ki: qi >= ki
        window = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < WINDOW)
        if variant == "sliding_window":
            return None, window
        if variant == "alibi":
            slopes = torch.tensor(alibi_slopes(heads), device="cuda", dtype=torch.float32)
            return (lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki)), causal
        if variant == "softcap":
            return (lambda s, b, h, qi, ki: SOFTCAP * torch.tanh(s / SOFTCAP)), window
        if variant == "document":
            return None, (lambda b, h, qi, ki: (qi >= ki) & (doc[b, qi] == doc[b, ki]))
        raise ValueError(variant)

    def document_ids(self, batch, seq, seed=0):
        """Ragged packed documents: 1 to 8 per sequence (like mixc's own random ids)."""
        import random
        rng = random.Random(seed)
        rows = []
        for _ in range(batch):
            n = rng.randint(1, 8)
            cuts = sorted(rng.sample(range(1, seq), min(n - 1, seq - 1)))
            ids, d, start = [], 0, 0
            for c in cuts + [seq]:
                ids += [d] * (c - start)
                d, start = d + 1, c
            rows.append(ids)
        return rows

    def flex(self):
        a = self.args
        flex_attention = create_block_mask = None
        for dim in a.dims:
            for variant in ("sliding_window", "alibi", "softcap", "document"):
                for seq in a.seqs:
                    batch, heads = self.grid_shape(seq, dim)
                    case = f"{variant} d={dim} L={seq} B={batch} H={heads}"
                    sets = [f"heads={heads}", f"kv_heads={heads}", f"head_dim={dim}", f"value_dim={dim}"]
                    print(f"[flex] {case}", file=sys.stderr)
                    torch_ok = self.need_torch(f"flex {case}")
                    inputs = doc = None
                    if variant == "document" and torch_ok:
                        # mixc and flex read the same q, k, v and document ids.
                        torch = self.torch
                        from safetensors.torch import save_file
                        q, k, v = self.qkv(batch, heads, seq, dim)
                        doc = torch.tensor(self.document_ids(batch, seq), dtype=torch.int32, device="cuda")
                        inputs = os.path.join(self.workdir, "document.safetensors")
                        save_file({"q": q.transpose(1, 2).contiguous().cpu(),
                                   "k": k.transpose(1, 2).contiguous().cpu(),
                                   "v": v.transpose(1, 2).contiguous().cpu(),
                                   "doc": doc.cpu()}, inputs)
                    if inputs:
                        m = self.run_mixc(self.mixc_cmd(SPECS[variant], inputs=inputs, sets=sets), f"flex {case}")
                    else:
                        m = self.run_mixc(self.mixc_cmd(SPECS[variant], seq=seq, batch=batch, sets=sets),
                                          f"flex {case}")
                    if not torch_ok:
                        self.add("flex", case, m, "flex", None)
                        continue
                    torch = self.torch
                    if flex_attention is None:
                        from torch.nn.attention.flex_attention import flex_attention as fa, create_block_mask
                        flex_attention = torch.compile(fa, dynamic=False)
                    if variant != "document":
                        q, k, v = self.qkv(batch, heads, seq, dim)
                    try:
                        score_mod, mask_mod = self.flex_mods(variant, heads, doc)
                        bm = create_block_mask(mask_mod, B=batch if variant == "document" else None, H=None,
                                               Q_LEN=seq, KV_LEN=seq, device="cuda")
                        fn = lambda: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
                        med, times = self.cuda_time(fn)
                        self.add("flex", case, m, "flex", med, times)
                    except Exception as e:
                        self.errors.append(f"flex {case}: {type(e).__name__}: {e}")
                        self.add("flex", case, m, "flex", None, note=type(e).__name__)
                    q = k = v = None  # free the GPU memory before the next shape
                    if inputs:
                        os.remove(inputs)
                    torch.cuda.empty_cache()

    @staticmethod
    def retention_chunkwise(torch, q, k, v, gammas, scale, chunk=64):
        """Retention o_i = sum_{j<=i} gamma_h^(i-j) (scale q_i . k_j) v_j in chunkwise
        form: a decayed masked product inside each chunk, plus the decayed
        state of all earlier chunks (a decayed prefix sum over chunk states,
        written as one matrix product so no Python loop runs per chunk).
        q, k: [B, H, L, dk]; v: [B, H, L, dv]; L a multiple of `chunk`."""
        B, H, L, dk = q.shape
        dv = v.shape[-1]
        n, C = L // chunk, chunk
        f32 = torch.float32
        lg = torch.log(torch.tensor(gammas, dtype=f32, device=q.device))  # [H]
        pos = torch.arange(C, device=q.device, dtype=f32)
        diff = pos[:, None] - pos[None, :]
        intra_decay = torch.where(diff >= 0, torch.exp(lg[:, None, None] * diff), torch.zeros((), device=q.device))
        qc = (q * scale).reshape(B, H, n, C, dk)
        kc = k.reshape(B, H, n, C, dk)
        vc = v.reshape(B, H, n, C, dv)
        s = torch.matmul(qc, kc.transpose(-1, -2)).float() * intra_decay[None, :, None]
        out = torch.matmul(s.to(v.dtype), vc).float()
        # State contributed by chunk c, decayed to the end of the chunk.
        kdec = kc * torch.exp(lg[:, None] * (C - 1 - pos)[None, :]).to(k.dtype)[None, :, None, :, None]
        states = torch.matmul(kdec.transpose(-1, -2), vc).float()  # [B, H, n, dk, dv]
        # Entering chunk c: sum_{c' < c} gamma^(C (c - 1 - c')) state_c'.
        cidx = torch.arange(n, device=q.device, dtype=f32)
        cd = cidx[:, None] - 1 - cidx[None, :]
        across = torch.where(cd >= 0, torch.exp(lg[:, None, None] * C * cd), torch.zeros((), device=q.device))
        entering = torch.einsum("hcs,bhsx->bhcx", across, states.reshape(B, H, n, dk * dv)).reshape(B, H, n, dk, dv)
        qdec = qc.float() * torch.exp(lg[:, None] * (pos + 1)[None, :])[None, :, None, :, None]
        out = out + torch.matmul(qdec, entering)
        return out.reshape(B, H, L, dv)

    @staticmethod
    def retention_quadratic(torch, q, k, v, gammas, scale):
        L = q.shape[2]
        pos = torch.arange(L, dtype=torch.float64, device=q.device)
        diff = pos[:, None] - pos[None, :]
        lg = torch.log(torch.tensor(gammas, dtype=torch.float64, device=q.device))
        d = torch.where(diff >= 0, torch.exp(lg[:, None, None] * diff), torch.zeros((), dtype=torch.float64))
        s = torch.matmul(q.double() * scale, k.double().transpose(-1, -2)) * d
        return torch.matmul(s, v.double())

    def linear(self):
        a = self.args
        heads, dk, dv = 8, 64, 128  # retention_retnet's own shape
        for seq in a.seqs:
            # 8 heads only (the spec's), so 4x the tokens of the softmax grid.
            batch = max(1, a.tokens * 4 // seq)
            case = f"retention d_k={dk} d_v={dv} L={seq} B={batch} H={heads}"
            print(f"[linear] {case}", file=sys.stderr)
            m = self.run_mixc(self.mixc_cmd(SPECS["retention"], seq=seq, batch=batch), f"linear {case}")
            if not self.need_torch(f"linear {case}"):
                self.add("linear", case, m, "torch-chunkwise", None)
                continue
            torch = self.torch
            q, k, v = self.qkv(batch, heads, seq, dk, dv=dv)
            g = retention_gammas(heads)
            fn = lambda: self.retention_chunkwise(torch, q, k, v, g, RETENTION_SCALE)
            try:
                med, times = self.cuda_time(fn)
                self.add("linear", case, m, "torch-chunkwise", med, times)
            except Exception as e:
                self.errors.append(f"linear {case}: {type(e).__name__}: {e}")
                self.add("linear", case, m, "torch-chunkwise", None, note=type(e).__name__)
            q = k = v = None  # free the GPU memory before the next shape
            torch.cuda.empty_cache()

    def ring(self):
        a = self.args
        base = None
        for r in a.ring_ranks:
            case = f"causal L={a.ring_seq} R={r}"
            print(f"[ring] {case}", file=sys.stderr)
            m = self.run_mixc(self.mixc_cmd(SPECS["causal"], seq=a.ring_seq, ranks=r), f"ring {case}")
            if r == 1:
                base = m
            # The "peer" of R ranks is the same run at R = 1.
            base_s = (base or {}).get("median_s")
            row = self.add("ring", case, m, "mixc R=1", base_s)
            if row["ratio"] is not None:
                row["note"] = f"overhead {100 * (row['ratio'] - 1):+.1f}%"

    def longest(self):
        a = self.args
        heads, dim = 8, 128
        sets = [f"heads={heads}", f"kv_heads={heads}", f"head_dim={dim}"]
        results = {}
        # mixc
        seq, best, why = a.longest_start, None, "limit of the search"
        while seq <= a.longest_max:
            print(f"[longest] mixc L={seq}", file=sys.stderr)
            m = self.run_mixc(self.mixc_cmd(SPECS["causal"], seq=seq, sets=sets, reps=1, warmup=0),
                              f"longest mixc L={seq}")
            if a.dry_run:
                break
            if not m or m.get("error"):
                why = (m or {}).get("error") or "failed"
                if self.errors:
                    self.errors.pop()  # running out is the expected end of this search
                break
            best = (seq, m["median_s"])
            if m["median_s"] > a.longest_cap_s:
                why = f"time cap ({m['median_s']:.0f} s > {a.longest_cap_s} s)"
                break
            seq *= 2
        results["mixc"] = {"longest": best, "stopped": why}
        if self.need_torch("longest: SDPA"):
            torch = self.torch
            import torch.nn.functional as F
            from torch.nn.attention import SDPBackend, sdpa_kernel
            seq, best, why = a.longest_start, None, "limit of the search"
            while seq <= a.longest_max:
                print(f"[longest] sdpa-flash L={seq}", file=sys.stderr)
                try:
                    q, k, v = self.qkv(1, heads, seq, dim)
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        med, _ = self.cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                reps=1, warmup=0)
                    q = k = v = None  # free the GPU memory before the next shape
                    torch.cuda.empty_cache()
                except torch.OutOfMemoryError as e:
                    why = f"out of memory: {str(e).splitlines()[0]}"
                    break
                except Exception as e:  # e.g. a launch-size limit of the kernel
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    break
                best = (seq, med)
                if med > a.longest_cap_s:
                    why = f"time cap ({med:.0f} s > {a.longest_cap_s} s)"
                    break
                seq *= 2
            results["sdpa-flash"] = {"longest": best, "stopped": why}
        for impl, r in results.items():
            L = r["longest"][0] if r["longest"] else None
            self.rows.append({"section": "longest", "case": f"causal B=1 H={heads} d={dim}", "peer": impl,
                              "mixc_s": None, "peer_s": None, "ratio": None, "longest_seq": L,
                              "note": f"longest L = {L}, stopped: {r['stopped']}"})

    def tune(self):
        a = self.args
        for kind, seq in TUNE_CASES:
            if a.smoke:
                seq = 256
            cmd = [a.mixc, "tune", SPECS[kind], "--seq", str(seq), "--backend", a.backend,
                   "--budget", str(a.tune_budget), "--force", "--json"]
            print(f"[tune] {kind} L={seq}", file=sys.stderr)
            if a.dry_run:
                print("  " + shlex.join(cmd))
                continue
            env = dict(os.environ, MIXC_CACHE_DIR=self.cache_dir)
            try:
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                                   timeout=a.tune_budget * 3 + 120)
            except subprocess.TimeoutExpired:
                self.errors.append(f"tune {kind}: timed out")
                continue
            row = {"section": "tune", "case": f"{kind} L={seq}", "peer": "default config",
                   "mixc_s": None, "peer_s": None, "ratio": None, "command": shlex.join(cmd)}
            if p.returncode != 0:
                msg = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
                self.errors.append(f"tune {kind}: exit {p.returncode}: {msg}")
                row["note"] = f"error: {msg}"
            else:
                t = json.loads(p.stdout)
                row["tune"] = t
                sp = t.get("speedup")
                best = (t.get("chosen") or {}).get("median_s")
                default = t.get("default_median_s")
                row.update(mixc_s=best, peer_s=default)
                # ratio tuned/default, like the others: below 1 means tuning helped.
                row["ratio"] = (1 / sp) if sp else None
                row["note"] = f"speedup {sp:.2f}x" if sp else "no speedup reported"
            self.rows.append(row)

    # ---------- report ----------
    def table(self):
        fmt = lambda s: "-" if s is None else (f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s")
        tf = lambda x: "-" if x is None else f"{x:.3g}"
        lines = ["| section | case | peer | mixc | peer time | mixc / peer | mixc TFLOP/s | peer TFLOP/s | note |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in self.rows:
            ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
            lines.append(f"| {r['section']} | {r['case']} | {r['peer']} | {fmt(r.get('mixc_s'))} | "
                         f"{fmt(r.get('peer_s'))} | {ratio} | {tf(r.get('mixc_tflops'))} | "
                         f"{tf(r.get('peer_tflops'))} | {r.get('note', '')} |")
        return "\n".join(lines)

    def targets(self):
        """The issue's aims, judged on this run's rows (None: not measured)."""
        def ratios(pred):
            return [r["ratio"] for r in self.rows if r.get("ratio") is not None and pred(r)]
        out = {}
        big = lambda r: r.get("mixc", {}).get("seq", 0) >= 4096 and r.get("mixc", {}).get("head_dim") == 128
        rs = ratios(lambda r: r["section"] == "sdpa" and r["peer"] == "sdpa-flash" and big(r))
        out["softmax causal/full, L >= 4k, d=128: mixc <= SDPA flash"] = (max(rs) <= 1.0) if rs else None
        rs = ratios(lambda r: r["section"] == "flex")
        out["masked variants faster than FlexAttention"] = (max(rs) < 1.0) if rs else None
        rs = ratios(lambda r: r["section"] == "ring" and r["case"].endswith("R=4"))
        out["ring overhead at R=4 under 10%"] = (rs[0] < 1.10) if rs else None
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--mixc", default=os.path.join(ROOT, "dist", "mixc"), help="mixc binary (default dist/mixc)")
    p.add_argument("--sections", type=lambda s: parse_list(s, str), default=SECTIONS,
                   help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--seqs", type=parse_list, default=parse_list("1k,2k,4k,8k,16k,32k,64k"))
    p.add_argument("--dims", type=lambda s: parse_list(s, int), default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch * L of the sdpa/flex grid")
    p.add_argument("--head-budget", type=int, default=2048, help="heads * head_dim of the sdpa/flex grid")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--backend", default="cuda", choices=["cuda", "cpu"], help="mixc backend")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ring-seq", type=parse_len, default=parse_len("128k"))
    p.add_argument("--ring-ranks", type=lambda s: parse_list(s, int), default=[1, 2, 4, 8])
    p.add_argument("--longest-start", type=parse_len, default=parse_len("64k"))
    p.add_argument("--longest-max", type=parse_len, default=parse_len("16m"))
    p.add_argument("--longest-cap-s", type=float, default=20.0,
                   help="stop doubling once one run takes longer than this")
    p.add_argument("--tune-budget", type=float, default=60.0, help="seconds per `mixc tune`")
    p.add_argument("--point-timeout", type=float, default=300.0, help="seconds per mixc process")
    p.add_argument("--out-dir", default=".", help="writes peers.json and peers.md here")
    p.add_argument("--dry-run", action="store_true", help="print the grid and mixc commands; run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, mixc on the CPU backend, no torch")
    p.add_argument("--self-test", action="store_true", help="check the chunkwise reference (CPU torch) and exit")
    args = p.parse_args(argv)
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")

    if args.self_test:
        import torch
        torch.manual_seed(0)
        B, H, L, dk, dv = 2, 3, 256, 16, 8
        q, k, v = (torch.randn(B, H, L, d, dtype=torch.float32) for d in (dk, dk, dv))
        g = retention_gammas(H)
        got = Runner.retention_chunkwise(torch, q, k, v, g, RETENTION_SCALE, chunk=32)
        want = Runner.retention_quadratic(torch, q, k, v, g, RETENTION_SCALE)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        print(f"chunkwise vs quadratic retention: max relative error {err:.2e}")
        return 0 if err < 1e-4 else 1

    if args.smoke:
        args.backend, args.dtype = "cpu", "f32"
        args.seqs, args.dims, args.tokens, args.head_budget = [128], [32], 128, 64
        args.reps, args.warmup = 1, 0
        args.ring_seq, args.ring_ranks = 256, [1, 2, 4, 8]
        args.longest_start, args.longest_max, args.longest_cap_s = 128, 512, 60.0
        args.tune_budget = 2.0
    if not args.dry_run and not os.access(args.mixc, os.X_OK):
        p.error(f"--mixc {args.mixc} is not an executable (build it: scripts/build-for-device.sh)")

    r = Runner(args)
    started = time.time()
    timings = {}
    for s in args.sections:
        t0 = time.time()
        getattr(r, s)()
        timings[s] = round(time.time() - t0, 1)
        print(f"[{s}] done in {timings[s]} s", file=sys.stderr)
    table = r.table()
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items()},
        "torch_version": getattr(r.torch, "__version__", None),
        "gpu": r.torch.cuda.get_device_name(0) if r.torch else None,
        "section_seconds": timings, "total_seconds": round(time.time() - started, 1),
        "targets": None if args.smoke else r.targets(), "rows": r.rows, "errors": r.errors, "not_exercised": r.not_exercised,
    }
    if not args.dry_run:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "peers.json"), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        with open(os.path.join(args.out_dir, "peers.md"), "w") as f:
            f.write(table + "\n")
        print(table)
        if args.smoke:
            print("targets: not judged (smoke: tiny shapes on the CPU)")
        for name, ok in (doc["targets"] or {}).items():
            print(f"target: {name}: {'met' if ok else 'NOT met' if ok is False else 'not measured'}")
    # Never a silent skip: say per section what was not run and why.
    groups = {}
    for x in r.not_exercised:
        case, why = x.split(": ", 1)
        groups.setdefault((case.split(" ")[0], why), []).append(case)
    for (section, why), cases in sorted(groups.items()):
        print(f"NOT EXERCISED: {section}: {why}, {len(cases)} case(s)", file=sys.stderr)
    for e in r.errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
