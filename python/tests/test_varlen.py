"""Packed variable-length batches through `m(q, k, v, cu_seqlens=...)`:
equal to each sequence run alone (and to SDPA per sequence), forward and
gradients, with decode-style query lengths, per-position and per-sequence
extra inputs, errors, and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import mixc

CAUSAL = "mixer packed { heads = 4; kv_heads = 2; head_dim = 16; mask = causal; }"


def cu_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def test_packed_causal_equals_sdpa_per_sequence_with_gradients():
    m = mixc.Mixer(CAUSAL)
    lengths = [5, 1, 37, 0, 64, 12]
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, total, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(1, total, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(1, total, 2, 16, generator=g, requires_grad=True)
    d_o = torch.randn(1, total, 4, 16, generator=g)
    o = m(q, k, v, cu_seqlens=cu_of(lengths))
    assert o.shape == (1, total, 4, 16)
    o.backward(d_o)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = (t.detach()[:, sl].clone().requires_grad_() for t in (q, k, v))
        want = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
        if n:
            want.backward(d_o[:, sl])
            assert rel(o[:, sl].detach(), want.detach()) < 2e-4
            for got, ref in ((q, qs), (k, ks), (v, vs)):
                # Judged against the whole gradient's scale (dq of a
                # one-token sequence is 0, and rounding noise in mixc).
                err = (got.grad[:, sl] - ref.grad).abs().max() / got.grad.abs().max()
                assert err < 5e-4
        start += n


def test_packed_decode_lengths_and_extras_equal_separate_calls():
    # Per-position gates (packed like the keys) and decode-style queries.
    gated = mixc.Mixer("""mixer g { heads = 2; head_dim = 8; input g: f32[batch, seq, heads];
                          score = dot(q, k); scale = 1.0; decay = gate(g); mask = causal; norm = none; }""")
    prefix = mixc.Mixer("""mixer p { heads = 2; head_dim = 8; input prefix: f32[batch];
                           mask = j <= i || j < int(prefix[b]); }""")
    gen = torch.Generator().manual_seed(1)
    for m, lq, lk in ((gated, [3, 9, 1], [3, 9, 1]), (prefix, [1, 4, 2], [30, 4, 17])):
        tq, tk = sum(lq), sum(lk)
        q = torch.randn(1, tq, 2, 8, generator=gen)
        k = torch.randn(1, tk, 2, 8, generator=gen)
        v = torch.randn(1, tk, 2, 8, generator=gen)
        if m is gated:
            extra = {"g": 0.8 + 0.2 * torch.rand(1, tk, 2, generator=gen)}
        else:
            extra = {"prefix": torch.tensor([20.0, 2.0, 5.0])}
        o = m(q, k, v, cu_seqlens_q=cu_of(lq), cu_seqlens_k=cu_of(lk), **extra)
        sq = sk = 0
        for s, (a, b) in enumerate(zip(lq, lk)):
            one = {n: (t[:, sk:sk + b] if n == "g" else t[s:s + 1]) for n, t in extra.items()}
            want = m(q[:, sq:sq + a], k[:, sk:sk + b], v[:, sk:sk + b], **one)
            assert torch.allclose(o[:, sq:sq + a], want, atol=1e-6), (m.name, s)
            sq, sk = sq + a, sk + b


def test_packed_batches_are_checked():
    m = mixc.Mixer(CAUSAL)
    x = torch.randn(1, 10, 4, 16)
    kv = torch.randn(1, 10, 2, 16)
    with pytest.raises(ValueError, match="q"):
        m(x, kv, kv, cu_seqlens=[0, 4, 9])
    with pytest.raises(ValueError, match="decrease"):
        m(x, kv, kv, cu_seqlens=[0, 6, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x, kv, kv, cu_seqlens_q=[0, 10])
    with pytest.raises(ValueError, match="integer"):
        m(x, kv, kv, cu_seqlens=torch.tensor([0.0, 10.0]))


def test_packed_calls_compile_with_fullgraph():
    m = mixc.Mixer(CAUSAL)
    cu = cu_of([7, 9])
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 16, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 16, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 16, 2, 16, generator=g, requires_grad=True)

    def f(q, k, v, cu):
        return m(q, k, v, cu_seqlens=cu).sum()

    eager = f(q, k, v, cu)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    assert torch.allclose(eager, compiled)
    compiled.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_paged_kv_cache_equals_the_contiguous_cache():
    m = mixc.Mixer("mixer paged { heads = 4; kv_heads = 2; head_dim = 16; mask = causal && window(50); }")
    g = torch.Generator().manual_seed(5)
    lens, page, sq = [37, 1, 130], 16, 4
    need = [-(-n // page) for n in lens]
    pages = sum(need) + 2
    perm = torch.randperm(pages, generator=g).tolist()
    k_cache = torch.zeros(pages, page, 2, 16)
    v_cache = torch.zeros(pages, page, 2, 16)
    table = torch.full((3, max(need)), -1, dtype=torch.int64)
    q = torch.randn(3, sq, 4, 16, generator=g)
    wants, nxt = [], 0
    for b, n in enumerate(lens):
        k = torch.randn(1, n, 2, 16, generator=g)
        v = torch.randn(1, n, 2, 16, generator=g)
        for c in range(need[b]):
            table[b, c] = perm[nxt]
            nxt += 1
        for pos in range(n):
            k_cache[table[b, pos // page], pos % page] = k[0, pos]
            v_cache[table[b, pos // page], pos % page] = v[0, pos]
        rows = min(sq, n)
        wants.append(m(q[b:b + 1, sq - rows:], k, v))
    with torch.no_grad():
        o = m(q, k_cache, v_cache, block_table=table, seq_lens=lens)
    assert o.shape == (3, sq, 4, 16)
    for b, want in enumerate(wants):
        rows = want.shape[1]
        assert torch.allclose(o[b:b + 1, sq - rows:], want, atol=1e-6), b
    with pytest.raises(ValueError, match="block_table"):
        m(q, k_cache, v_cache, block_table=table[:2], seq_lens=lens)
    with pytest.raises(ValueError, match="seq_lens"):
        m(q, k_cache, v_cache, block_table=table)
    with pytest.raises(NotImplementedError, match="inference"):
        m(q.clone().requires_grad_(), k_cache, v_cache, block_table=table, seq_lens=lens)


@pytest.mark.parametrize("example", ["linear_elu", "retention_retnet", "gated_mamba2"])
def test_decode_steps_with_a_recurrent_state_equal_one_forward(example):
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    m = mixc.Mixer(os.path.join(root, "examples", example + ".mix"))
    info = m.info
    g = torch.Generator().manual_seed(6)
    L = 70
    q = torch.randn(2, L, info["heads"], info["head_dim"], generator=g)
    k = torch.randn(2, L, info["kv_heads"], info["head_dim"], generator=g)
    v = torch.randn(2, L, info["kv_heads"], info["value_dim"], generator=g)
    extra = {}
    if example == "gated_mamba2":
        extra["g"] = 0.9 + 0.1 * torch.rand(2, L, info["heads"], generator=g)
    want = m(q, k, v, **extra)
    state, outs, at = None, [], 0
    for n in (60, 1, 1, 1, 7):
        part = {name: t[:, at:at + n] for name, t in extra.items()}
        o, state = m.forward_state(q[:, at:at + n], k[:, at:at + n], v[:, at:at + n], state, **part)
        outs.append(o)
        at += n
    assert rel(torch.cat(outs, 1), want) < 1e-5
    with pytest.raises(ValueError, match="state"):
        m.forward_state(q[:1, :3], k[:1, :3], v[:1, :3], state, **{n: t[:1, :3] for n, t in extra.items()})


def test_softmax_mixers_carry_no_recurrent_state():
    m = mixc.Mixer(CAUSAL)
    x = torch.randn(1, 4, 4, 16)
    kv = torch.randn(1, 4, 2, 16)
    with pytest.raises(NotImplementedError, match="recurrent state"):
        m.forward_state(x, kv, kv)
