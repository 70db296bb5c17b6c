"""One process of a ring over torch.distributed (gloo), run by
test_ring.py: `python ring_worker.py RANK WORLD INIT_FILE`. For each case
it computes the whole sequence in this process (the single-process
answer), then its shard through `m(q, k, v, group=...)`, and checks its
rows of `o` and of every gradient (and the whole extra inputs' gradients)
against the single-process ones. Exits non-zero on any mismatch."""

import os
import sys

import torch
import torch.distributed as dist

import mixc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (example, sequence length): softmax (GQA, zigzag; a bias table; document
# ids), the linear family, a gated one (a gate input with a gradient), a
# non-causal linear mixer (global state), and the convolution.
CASES = [
    ("causal_gqa_llama3", 45),
    ("relative_bias_t5", 38),
    ("document_mask", 41),
    ("linear_elu", 50),
    ("gated_mamba2", 47),
    ("long_conv_hyena", 40),
]


def extras_for(info, b, seq, gen):
    """The Python tests' extra inputs (test_mixc.random_extra), in f32."""
    from test_mixc import random_extra

    return {n: (t.float() if t.is_floating_point() else t) for n, t in random_extra(info, b, seq, gen).items()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-6)).item()


def run_case(name, seq, rank, world, spec_text=None, sharding=None):
    m = mixc.Mixer(spec_text or os.path.join(ROOT, "examples", name + ".mix"), threads=1, sharding=sharding)
    info = m.info
    sharding = info["sharding"]
    gen = torch.Generator().manual_seed(seq)
    b, h, kvh, dk, dv = 2, info["heads"], info["kv_heads"], info["head_dim"], info["value_dim"]
    q = torch.randn(b, seq, h, dk, generator=gen)
    k = torch.randn(b, seq, kvh, dk, generator=gen)
    v = torch.randn(b, seq, kvh, dv, generator=gen)
    extra = extras_for(info, b, seq, gen)
    d_o = torch.randn(b, seq, h, dv, generator=gen)
    diff = set(info["differentiable"])
    reads_qk = info["reads_qk"]

    # The whole sequence in this process.
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ex = {n: (t.clone().requires_grad_() if n in diff else t) for n, t in extra.items()}
    want = m(*(ins if reads_qk else (None, None, ins[2])), **ex)
    want.backward(d_o)

    # This rank's shard through the ring.
    mine = [mixc.shard(t, rank, world, sharding=sharding).requires_grad_() for t in (q, k, v)]
    ex_r = {n: (t.clone().requires_grad_() if n in diff else t) for n, t in extra.items()}
    got = m(*(mine if reads_qk else (None, None, mine[2])), group=dist.group.WORLD, **ex_r)
    got.backward(mixc.shard(d_o, rank, world, sharding=sharding))

    errs = {"o": rel(got, mixc.shard(want.detach(), rank, world, sharding=sharding))}
    for label, g, w, used in (("dq", mine[0], ins[0], reads_qk), ("dk", mine[1], ins[1], reads_qk),
                              ("dv", mine[2], ins[2], True)):
        if used:
            errs[label] = rel(g.grad, mixc.shard(w.grad, rank, world, sharding=sharding))
    for n in diff:
        errs["d" + n] = rel(ex_r[n].grad, ex[n].grad)
    bad = {key: e for key, e in errs.items() if not e < 1e-4}
    if bad:
        raise AssertionError(f"rank {rank}/{world} {name} L={seq} {sharding}: {errs}")
    # The whole output, gathered: the shards put back in order.
    parts = [None] * world  # shard lengths differ by a position or two
    dist.all_gather_object(parts, got.detach())
    whole = mixc.unshard(parts, sharding=sharding)
    if rel(whole, want.detach()) >= 1e-4:
        raise AssertionError(f"{name}: unshard of the gathered shards differs")


def run_bf16_case(rank, world):
    """bf16 shards go through the ring as they are (read in place, `o` in
    bf16): the gathered output is the whole sequence's bf16 output within
    the bf16 tolerance, and its gradients flow."""
    m = mixc.Mixer(os.path.join(ROOT, "examples", "causal_gqa_llama3.mix"), threads=1)
    sharding = m.info["sharding"]
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 70, 32, 128, generator=gen).bfloat16()
    k, v = (torch.randn(1, 70, 8, 128, generator=gen).bfloat16() for _ in range(2))
    with torch.no_grad():
        want = m(q, k, v)
        got = m(*(mixc.shard(t, rank, world, sharding=sharding) for t in (q, k, v)), group=dist.group.WORLD)
    assert got.dtype == torch.bfloat16, got.dtype
    e = rel(got.float(), mixc.shard(want, rank, world, sharding=sharding).float())
    if not e < 1e-2:
        raise AssertionError(f"rank {rank}/{world} bf16 ring: {e}")
    mine = [mixc.shard(t, rank, world, sharding=sharding).requires_grad_() for t in (q, k, v)]
    m(*mine, group=dist.group.WORLD).float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in mine)


def block_cases():
    """Blocks around a ring: test_block's Llama-style block (GQA, rope;
    zigzag) and its packed-documents block with a learned slope table (a
    whole extra input whose gradient is summed over the ranks; contiguous)."""
    from test_block import DOCS, LLAMA

    return [(LLAMA, 29, None), (DOCS, 31, "contiguous")]


def run_block_case(text, seq, rank, world, sharding):
    """A block's shard through the ring equals its rows of the whole
    sequence's block in this process, forward and backward: dx rows, every
    weight's gradient (summed over the group) and the slopes' gradient."""
    torch.manual_seed(seq)
    block = mixc.Block(text, threads=1, block_rows=8, sharding=sharding)
    sharding = block.info["sharding"]
    b = 2
    x = torch.randn(b, seq, block.width)
    g = torch.randn(b, seq, block.width)
    names = [i["name"] for i in block.info["mixer"]["inputs"]]
    extra = {}
    if "doc" in names:
        extra["doc"] = torch.tensor([[0] * (seq // 3) + [1] * (seq - seq // 3), [0] * seq], dtype=torch.int32)
        extra["slopes"] = torch.rand(4)

    def run(xin, ex, group):
        block.zero_grad()
        ex = {n: (t.clone().requires_grad_() if t.is_floating_point() else t) for n, t in ex.items()}
        xin = xin.clone().requires_grad_()
        out = block(xin, group=group, **ex)
        return out, xin, ex

    want, xw, exw = run(x, extra, None)
    (want * g).sum().backward()
    w_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    got, xr, exr = run(mixc.shard(x, rank, world, sharding=sharding), extra, dist.group.WORLD)
    (got * mixc.shard(g, rank, world, sharding=sharding)).sum().backward()
    errs = {"out": rel(got, mixc.shard(want.detach(), rank, world, sharding=sharding)),
            "dx": rel(xr.grad, mixc.shard(xw.grad, rank, world, sharding=sharding))}
    for n, p in block.named_parameters():
        errs[n] = rel(p.grad, w_grads[n])
    for n, t in exr.items():
        if t.is_floating_point():
            errs["d" + n] = rel(t.grad, exw[n].grad)
    bad = {key: e for key, e in errs.items() if not e < 1e-4}
    if bad:
        raise AssertionError(f"rank {rank}/{world} block L={seq} {sharding}: {bad}")
    if len(errs) < 2 + 9:
        raise AssertionError(f"too few gradients compared: {sorted(errs)}")


def run_compiled(rank, world):
    """The ring call under torch.compile(fullgraph=True): the op
    `mixc::mix_ring` takes the group by name, so the graph has no break;
    output and gradients (q, k, v and a slope table summed over the group)
    equal the eager ring's."""
    m = mixc.Mixer("mixer c { heads = 4; kv_heads = 2; head_dim = 8; input slopes: f32[heads]; "
                   "bias = -slopes[h] * (i - j); mask = causal; }", threads=1)
    sharding = m.info["sharding"]
    gen = torch.Generator().manual_seed(7)
    seq = 30
    q, k, v = (torch.randn(2, seq, hh, 8, generator=gen) for hh in (4, 2, 2))
    slopes = torch.rand(4, generator=gen)
    mine = [mixc.shard(t, rank, world, sharding=sharding) for t in (q, k, v)]

    def layer(q, k, v, slopes):
        return (m(q, k, v, slopes=slopes, group=dist.group.WORLD) * 1.5).sum()

    def step(fn):
        ins = [t.clone().requires_grad_() for t in (*mine, slopes)]
        fn(*ins).backward()
        return [t.grad for t in ins]

    want = step(layer)
    torch._dynamo.reset()
    got = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    errs = {n: rel(g, w) for n, g, w in zip(("dq", "dk", "dv", "dslopes"), got, want)}
    if not all(e < 1e-5 for e in errs.values()):
        raise AssertionError(f"rank {rank}/{world} compiled ring: {errs}")

    # A block's ring (the op mixc::block_ring) too: x's and every weight's gradient.
    text, bseq, _ = block_cases()[0]
    block = mixc.Block(text, threads=1, block_rows=8)
    x = mixc.shard(torch.randn(2, bseq, block.width, generator=gen), rank, world,
                   sharding=block.info["sharding"])

    def run_block(fn):
        block.zero_grad()
        xin = x.clone().requires_grad_()
        fn(xin).square().sum().backward()
        return [xin.grad] + [p.grad.clone() for _, p in sorted(block.named_parameters())]

    def block_layer(xin):
        return block(xin, group=dist.group.WORLD)

    want = run_block(block_layer)
    torch._dynamo.reset()
    got = run_block(torch.compile(block_layer, fullgraph=True, backend="aot_eager"))
    errs = [rel(g, w) for g, w in zip(got, want)]
    if len(errs) != 10 or not all(e < 1e-5 for e in errs):
        raise AssertionError(f"rank {rank}/{world} compiled block ring: {errs}")


def main():
    rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        for name, seq in CASES:
            run_case(name, seq, rank, world)
        # Contiguous sharding of a causal mixer (the sharding is the mixer's).
        run_case("causal_gqa_llama3", 33, rank, world, sharding="contiguous")
        run_bf16_case(rank, world)
        for text, seq, sharding in block_cases():
            run_block_case(text, seq, rank, world, sharding)
        run_compiled(rank, world)
        # A shard that is not this rank's is refused, naming the fix.
        m = mixc.Mixer(os.path.join(ROOT, "examples", "causal_gqa_llama3.mix"))
        n = 5 + 3 * rank  # no rank's zigzag shard of the whole (13 or 38 positions)
        x = torch.randn(1, n, 32, 128)
        y = torch.randn(1, n, 8, 128)
        try:
            m(x, y, y, group=dist.group.WORLD)
        except ValueError as e:
            if "mixc.shard" not in str(e):
                raise
        else:
            if world > 1:
                raise AssertionError("a wrong shard length was accepted")
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}/{world}: ok")


if __name__ == "__main__":
    main()
