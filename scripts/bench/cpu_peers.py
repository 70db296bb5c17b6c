#!/usr/bin/env python3
"""mixc's CPU backend against PyTorch formulations of the same mixers on the
CPU, f32 and bf16, in interleaved rounds (issue 21):

  window    sliding_window_mistral (causal && window(4096)) vs SDPA with an
            explicit boolean mask, and vs torch.compile'd flex_attention
  alibi     alibi_bloom vs compiled flex_attention (score_mod)
  softcap   softcap_window_gemma2 (50 tanh(s/50), window 4096) vs compiled flex
  linear    linear_elu (elu+1 maps, sum normalisation) vs a chunkwise PyTorch form
  retention retention_retnet vs the same chunkwise form with a per-head decay
  gated     gated_mamba2 (data-dependent decay) vs the chunkwise form with gates
  conv      long_conv_hyena vs torch.fft (an FFT convolution, O(L log L))

Every case runs with batch 1 and --heads heads (kv_heads = heads), each
spec's own head dims. mixc: `mixc bench` in its own process (the median of
--reps after --warmup); PyTorch: the same in this process, on tensors of the
same dtype (flex compiled once per shape before timing). Each round runs every
(case, L, dtype) point, mixc then the peers; a point's time is the median over
--rounds. Ratios are mixc / peer (below 1: mixc faster).

--self-test checks every PyTorch formulation against mixc's Python package
(f32, L = 200) before timing, so the peers compute what the specs say.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from peers import alibi_slopes, retention_gammas  # noqa: E402

WINDOW, SOFTCAP = 4096, 50.0
CASES = {
    "window": "examples/sliding_window_mistral.mix",
    "alibi": "examples/alibi_bloom.mix",
    "softcap": "examples/softcap_window_gemma2.mix",
    "linear": "examples/linear_elu.mix",
    "retention": "examples/retention_retnet.mix",
    "gated": "examples/gated_mamba2.mix",
    "conv": "examples/long_conv_hyena.mix",
}
DIMS = {"window": (128, 128), "alibi": (64, 64), "softcap": (256, 256), "linear": (64, 64),
        "retention": (64, 128), "gated": (64, 64), "conv": (64, 64)}


def parse_len(s):
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


# ---------- PyTorch formulations, [B, H, L, D] layout ----------

def chunkwise(torch, q, k, v, log_decay, norm_eps=None, chunk=64):
    """o_i = sum_{j<=i} exp(A_i - A_j) (q_i . k_j) v_j, A the inclusive cumsum
    of log_decay [B, H, L] (None: no decay); with norm_eps, divided by the
    same sum with v = 1 plus eps. The chunked form of flash-linear-attention's
    reference: quadratic inside a chunk, a d_k x d_v state across chunks."""
    B, H, L, dk = q.shape
    if norm_eps is not None:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    dv = v.shape[-1]
    f = torch.float32
    out = torch.empty(B, H, L, dv, dtype=f)
    state = torch.zeros(B, H, dk, dv, dtype=f)
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        qc, kc, vc = q[:, :, s:e].to(f), k[:, :, s:e].to(f), v[:, :, s:e].to(f)
        n = e - s
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if log_decay is None:
            w = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
            out[:, :, s:e] = w @ vc + qc @ state
            state = state + kc.transpose(-1, -2) @ vc
        else:
            a = log_decay[:, :, s:e].to(f).cumsum(-1)  # [B, H, n]
            dmat = (a[..., :, None] - a[..., None, :]).masked_fill(~causal, -math.inf).exp()
            w = (qc @ kc.transpose(-1, -2)) * dmat
            out[:, :, s:e] = w @ vc + (qc * a[..., None].exp()) @ state
            last = a[..., -1:]
            state = state * last[..., None].exp() + (kc * (last - a)[..., None].exp()).transpose(-1, -2) @ vc
    if norm_eps is not None:
        out = out[..., :-1] / (out[..., -1:] + norm_eps)
    return out.to(q.dtype)


def fft_conv(torch, v, filt):
    """o_i = sum_{j<=i} f[h][i - j] v_j: v [B, H, L, D], f [H, L]."""
    L = v.shape[2]
    n = 2 * L
    fv = torch.fft.rfft(v.float(), n=n, dim=2)
    ff = torch.fft.rfft(filt.float(), n=n, dim=1)[None, :, :, None]
    return torch.fft.irfft(fv * ff, n=n, dim=2)[:, :, :L].to(v.dtype)


class Peers:
    def __init__(self, torch, heads):
        self.torch, self.heads = torch, heads
        import torch.nn.functional as F
        self.F = F
        self.flex = None
        self.block_masks = {}

    def flex_fn(self):
        if self.flex is None:
            from torch.nn.attention.flex_attention import flex_attention, create_block_mask
            self.torch._dynamo.config.cache_size_limit = 64
            self.flex = self.torch.compile(flex_attention, dynamic=False)
            self.create_block_mask = create_block_mask
        return self.flex

    def block_mask(self, kind, L):
        key = (kind, L)
        if key not in self.block_masks:
            self.flex_fn()
            if kind == "window":
                mm = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < WINDOW)
            else:
                mm = lambda b, h, qi, ki: qi >= ki
            self.block_masks[key] = self.create_block_mask(mm, None, None, L, L, device="cpu")
        return self.block_masks[key]

    def inputs(self, case, L, dtype, seed=0):
        """q, k, v [B, H, L, D] and the case's extra tensors, fixed per point."""
        t = self.torch
        g = t.Generator().manual_seed(seed)
        dk, dv = DIMS[case]
        H = self.heads
        q = t.randn(1, H, L, dk, generator=g).to(dtype)
        k = t.randn(1, H, L, dk, generator=g).to(dtype)
        v = t.randn(1, H, L, dv, generator=g).to(dtype)
        extra = {}
        if case == "gated":
            extra["g"] = t.sigmoid(t.randn(1, L, H, generator=g) + 3.0)  # [batch, seq, heads]
        if case == "conv":
            extra["f"] = t.randn(H, L, generator=g) * t.exp(-t.arange(L) / 64.0)[None]
        return q, k, v, extra

    def calls(self, case, L, q, k, v, extra):
        """(peer name, zero-argument callable) for the case."""
        t, F = self.torch, self.F
        H = self.heads
        if case == "window":
            i = t.arange(L)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < WINDOW)
            bm = self.block_mask("window", L)
            flex = self.flex_fn()
            return [("SDPA + bool mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                    ("flex (compiled)", lambda: flex(q, k, v, block_mask=bm))]
        if case == "alibi":
            slopes = t.tensor(alibi_slopes(H), dtype=t.float32)
            score_mod = lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki)
            bm = self.block_mask("causal", L)
            flex = self.flex_fn()
            return [("flex (compiled)", lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm))]
        if case == "softcap":
            score_mod = lambda s, b, h, qi, ki: SOFTCAP * t.tanh(s / SOFTCAP)
            bm = self.block_mask("window", L)
            flex = self.flex_fn()
            return [("flex (compiled)", lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm))]
        if case == "linear":
            phi = lambda x: F.elu(x.float()) + 1.0
            return [("chunkwise torch", lambda: chunkwise(t, phi(q), phi(k), v, None, norm_eps=1e-6))]
        if case == "retention":
            logg = t.log(t.tensor(retention_gammas(H), dtype=t.float32))[None, :, None].expand(1, H, L)
            return [("chunkwise torch", lambda: chunkwise(t, q * 0.125, k, v, logg))]
        if case == "gated":
            logg = t.log(extra["g"]).permute(0, 2, 1)  # [B, H, L]
            return [("chunkwise torch", lambda: chunkwise(t, q, k, v, logg))]
        if case == "conv":
            return [("torch.fft", lambda: fft_conv(t, v, extra["f"]))]
        raise ValueError(case)


def time_call(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def self_test(torch, peers):
    """Each formulation against mixc's Python package in f32 at L = 200 (the
    window and softcap cases shrink their window to 50 so it bites)."""
    import mixc
    global WINDOW
    saved, WINDOW = WINDOW, 50
    worst = {}
    try:
        for case, path in CASES.items():
            text = open(os.path.join(ROOT, path)).read().replace("window(4096)", "window(50)")
            m = mixc.Mixer(text)
            # mixc's layout is [B, L, H, D]; its spec decides kv_heads, so test
            # with the spec's own heads where they differ.
            info = m.info
            peers_c = Peers(torch, info["heads"])
            if info["kv_heads"] != info["heads"]:
                text = text.replace(f"kv_heads = {info['kv_heads']};", f"kv_heads = {info['heads']};")
                m = mixc.Mixer(text)
            q, k, v, extra = peers_c.inputs(case, 200, torch.float32, seed=1)
            args = {n: x for n, x in extra.items()}
            o = m(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **args).transpose(1, 2)
            for name, fn in peers_c.calls(case, 200, q, k, v, extra):
                got = fn()
                err = float((got.float() - o.float()).abs().max() / o.float().abs().max())
                worst[f"{case}: {name}"] = err
                if err > 2e-3:
                    raise SystemExit(f"self-test: {case} {name} differs from mixc by {err:.2e}")
    finally:
        WINDOW = saved
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixc", default=os.path.join(ROOT, "target", "release", "mixc"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seq", default="8k", help="lengths, comma-separated (k = 1024)")
    p.add_argument("--dtype", default="f32,bf16")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases):
        p.error(f"--cases takes {', '.join(CASES)}")
    seqs = [parse_len(s) for s in args.seq.split(",") if s]
    dtypes = [d for d in args.dtype.split(",") if d]

    import torch
    torch.manual_seed(0)
    peers = Peers(torch, args.heads)
    tested = self_test(torch, peers) if args.self_test else None
    if tested:
        print("self-test (max |peer - mixc| / max |mixc|, f32, L = 200): "
              + ", ".join(f"{k} {v:.1e}" for k, v in tested.items()), file=sys.stderr)
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}
    points = [(c, L, d) for c in cases for L in seqs for d in dtypes]
    got = {pt: {"mixc": [], "peers": {}} for pt in points}
    data = {}
    for rnd in range(args.rounds):
        for (case, L, dt) in points:
            dk, dv = DIMS[case]
            cmd = [args.mixc, "bench", CASES[case], "--backend", "cpu", "--dtype", dt, "--seq", str(L),
                   "--set", f"heads={args.heads}", "--set", f"kv_heads={args.heads}",
                   "--reps", str(args.reps), "--warmup", str(args.warmup), "--json"]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{shlex.join(cmd)}: {r.stderr.strip()[-400:]}")
            got[(case, L, dt)]["mixc"].append(json.loads(r.stdout)["rows"][0]["median_s"])
            got[(case, L, dt)]["command"] = shlex.join(cmd)
            if (case, L, dt) not in data:
                data[(case, L, dt)] = peers.inputs(case, L, tdt[dt])
            q, k, v, extra = data[(case, L, dt)]
            with torch.inference_mode():
                for name, fn in peers.calls(case, L, q, k, v, extra):
                    if rnd == 0:
                        fn()  # compile (flex) outside the timing
                    got[(case, L, dt)]["peers"].setdefault(name, []).append(
                        time_call(fn, args.reps, args.warmup))
            print(f"round {rnd + 1} {case} L={L} {dt}: mixc {got[(case, L, dt)]['mixc'][-1] * 1e3:.1f} ms, "
                  + ", ".join(f"{n} {ts[-1] * 1e3:.1f} ms" for n, ts in got[(case, L, dt)]["peers"].items()),
                  file=sys.stderr)
    rows = []
    lines = ["| case | L | dtype | mixc | peer | peer time | mixc / peer |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for (case, L, dt) in points:
        g = got[(case, L, dt)]
        m = statistics.median(g["mixc"])
        for name, ts in g["peers"].items():
            pt = statistics.median(ts)
            rows.append({"case": case, "seq": L, "dtype": dt, "mixc_s": m, "mixc_rounds_s": g["mixc"],
                         "peer": name, "peer_s": pt, "peer_rounds_s": ts, "ratio": m / pt,
                         "mixc_command": g["command"]})
            lines.append(f"| {case} | {L} | {dt} | {m * 1e3:.1f} ms | {name} | {pt * 1e3:.1f} ms | {m / pt:.2f} |")
    print(f"CPU peers: {args.heads} heads, batch 1, {args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "self_test": tested, "torch": torch.__version__,
                       "heads": args.heads, "rounds": args.rounds, "reps": args.reps}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
