"""The `mixc` Python package on CPU tensors: every example spec against an
independent dense PyTorch formulation (forward and gradients, f64 oracle),
errors, torch.compile, and a small language model trained with mixc
attention step for step equal to the same model with SDPA.

Run by scripts/test.sh (`python -m pytest python/tests`).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import mixc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def example(name):
    return os.path.join(EXAMPLES, name + ".mix")


def alibi_slope(h, heads):
    closest = 1 << (heads.bit_length() - 1)
    if h < closest:
        return 2.0 ** (-8.0 / closest * (h + 1))
    return 2.0 ** (-8.0 / (2 * closest) * (2 * (h - closest) + 1))


# ---------- dense references (f64): weights a[b, h, i, j], then o = norm(a) v ----------

def pos(seq):
    i = torch.arange(seq).view(seq, 1)
    j = torch.arange(seq).view(1, seq)
    return i, j


def softmax_ref(q, k, v, *, scale=None, mask=None, bias=None, transform=None):
    """q [b, L, h, d], k/v [b, L, kvh, d] (GQA by repeat) -> o [b, L, h, dv]."""
    b, L, h, d = q.shape
    g = h // k.shape[2]
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * (scale if scale is not None else 1 / math.sqrt(d))
    if bias is not None:
        s = s + bias
    if transform is not None:
        s = transform(s)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vv)


def linear_ref(q, k, v, *, scale, decay, qmap=None, kmap=None, eps=None):
    """Causal linear attention with decay D [b?, h, i, j] (multiplied in)."""
    b, L, h, d = q.shape
    g = h // k.shape[2]
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    if qmap:
        q, kk = qmap(q), kmap(kk)
    a = torch.einsum("bihd,bjhd->bhij", q, kk) * scale * decay
    i, j = pos(L)
    a = a * (j <= i)
    o = torch.einsum("bhij,bjhd->bihd", a, vv)
    if eps is not None:
        o = o / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return o


def elu1(x):
    return torch.where(x > 0, x + 1, torch.exp(x))


SOFTMAX = {
    "full_attention": lambda L, x: dict(),
    "causal_gqa_llama3": lambda L, x: dict(mask=pos(L)[1] <= pos(L)[0]),
    "sliding_window_mistral": lambda L, x: dict(
        mask=(pos(L)[1] <= pos(L)[0]) & ((pos(L)[0] - pos(L)[1]).abs() < 4096)),
    "prefix_lm": lambda L, x: dict(mask=(pos(L)[1] < 512) | (pos(L)[1] <= pos(L)[0])),
    "dilated_longnet": lambda L, x: dict(
        mask=(pos(L)[1] <= pos(L)[0]) & (((pos(L)[0] - pos(L)[1]).abs() < 512)
                                        | ((pos(L)[0] - pos(L)[1]) % 8 == 0))),
    "block_sparse_bigbird": lambda L, x: dict(
        mask=((pos(L)[0] // 64 - pos(L)[1] // 64).abs() < 2) | (pos(L)[1] // 64 < 1) | (pos(L)[0] // 64 < 1)),
    "alibi_bloom": lambda L, x: dict(
        mask=pos(L)[1] <= pos(L)[0],
        bias=-torch.tensor([alibi_slope(h, 16) for h in range(16)], dtype=torch.float64).view(1, 16, 1, 1)
        * (pos(L)[0] - pos(L)[1]).double()),
    "softcap_window_gemma2": lambda L, x: dict(
        mask=(pos(L)[1] <= pos(L)[0]) & ((pos(L)[0] - pos(L)[1]).abs() < 4096),
        transform=lambda s: 50.0 * torch.tanh(s / 50.0)),
    "relative_bias_t5": lambda L, x: dict(
        bias=x["rel"][:, (pos(L)[0] - pos(L)[1]).abs().clamp(max=127)].unsqueeze(0)),
    "chunked_llama4": lambda L, x: dict(
        mask=(pos(L)[1] <= pos(L)[0]) & (pos(L)[0] // 8192 == pos(L)[1] // 8192)),
    "document_mask": lambda L, x: dict(
        mask=(pos(L)[1] <= pos(L)[0]).unsqueeze(0).unsqueeze(0)
        & (x["doc"][:, None, :, None] == x["doc"][:, None, None, :])),
}


def gate_decay(g):
    """D[b, h, i, j] = prod_{l = j+1..i} g[b, l, h] (g [b, L, h])."""
    c = torch.cumsum(torch.log(g), dim=1)  # [b, L, h]
    c = c.permute(0, 2, 1)  # [b, h, L]
    i, j = pos(g.shape[1])
    return torch.exp((c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~(j <= i), 0.0))


OTHERS = {
    "linear_elu": lambda q, k, v, x: linear_ref(q, k, v, scale=1.0, decay=1.0, qmap=elu1, kmap=elu1, eps=1e-6),
    "retention_retnet": lambda q, k, v, x: linear_ref(
        q, k, v, scale=0.125,
        decay=torch.tensor([1 - 2.0 ** (-5 - h) for h in range(8)], dtype=torch.float64).view(1, 8, 1, 1)
        ** (pos(q.shape[1])[0] - pos(q.shape[1])[1]).clamp(min=0).double()),
    "gated_mamba2": lambda q, k, v, x: linear_ref(q, k, v, scale=1.0, decay=gate_decay(x["g"])),
}


def random_extra(info, b, L, gen):
    out = {}
    for i in info["inputs"]:
        shape = [b if d == "batch" else L if d == "seq" else d for d in i["dims"]]
        if i["dtype"] == "i32":
            # Sorted document ids: a few segments per sequence.
            out[i["name"]] = torch.sort(torch.randint(0, 4, shape, generator=gen), dim=-1).values.to(torch.int32)
        elif i["name"] == "g":
            out[i["name"]] = 0.9 + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)
        else:
            out[i["name"]] = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return out


def rel(a, b, floor=1e-12):
    """max |a - b| / max |b|, the denominator at least `floor`."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=floor)).item()


def check_example(name, L, ref_fn):
    m = mixc.Mixer(example(name), threads=2)
    info = m.info
    gen = torch.Generator().manual_seed(L)
    b = 2
    h, kvh, dk, dv = info["heads"], info["kv_heads"], info["head_dim"], info["value_dim"]
    q = torch.randn(b, L, h, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(b, L, kvh, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(b, L, kvh, dv, generator=gen, dtype=torch.float64)
    extra = random_extra(info, b, L, gen)
    d_o = torch.randn(b, L, h, dv, generator=gen, dtype=torch.float64)
    diff = set(info["differentiable"])
    # The oracle, in f64 with autograd.
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ex = {n: (t.clone().requires_grad_() if n in diff else t) for n, t in extra.items()}
    want = ref_fn(*ins, ex)
    want.backward(d_o)
    # mixc on f32 tensors.
    got_ins = [t.float().requires_grad_() for t in (q, k, v)]
    got_ex = {n: (t.float().requires_grad_() if n in diff else t) for n, t in extra.items()}
    got = m(*got_ins, **got_ex)
    assert got.dtype == torch.float32 and got.shape == want.shape
    got.backward(d_o.float())
    # A gradient that vanishes (dq, dk of a one-key row: rounding of
    # do.v - do.o) is judged against 1% of the largest gradient.
    refs = [t.grad for t in ins if t.grad is not None] + [ex[n].grad for n in diff]
    floor = 1e-2 * max(t.abs().max().item() for t in refs)
    errs = {"o": rel(got, want)}
    if info["reads_qk"]:
        errs["dq"] = rel(got_ins[0].grad, ins[0].grad, floor)
        errs["dk"] = rel(got_ins[1].grad, ins[1].grad, floor)
    errs["dv"] = rel(got_ins[2].grad, ins[2].grad, floor)
    for n in diff:
        errs["d" + n] = rel(got_ex[n].grad, ex[n].grad, floor)
    # f32 against f64: the output within 2e-4, gradients within 5e-4 (the
    # CLI's `--grad --check` tolerance for f32).
    bad = {k: e for k, e in errs.items() if not e < (2e-4 if k == "o" else 5e-4)}
    assert not bad, f"{name} L={L}: {errs}"


@pytest.mark.parametrize("name", sorted(SOFTMAX))
@pytest.mark.parametrize("L", [1, 37, 130])
def test_softmax_examples_match_dense_torch(name, L):
    def ref(q, k, v, ex):
        kw = SOFTMAX[name](L, ex)
        d = q.shape[-1]
        return softmax_ref(q, k, v, scale=1 / math.sqrt(d), **kw)
    check_example(name, L, ref)


@pytest.mark.parametrize("name", sorted(OTHERS))
@pytest.mark.parametrize("L", [1, 37, 130])
def test_linear_families_match_dense_torch(name, L):
    check_example(name, L, OTHERS[name])


@pytest.mark.parametrize("L", [1, 37, 130])
def test_convolution_matches_fft(L):
    """Hyena's long convolution against an FFT convolution."""
    def ref(q, k, v, ex):
        f = ex["f"]  # [heads, L]
        n = 2 * L
        fv = torch.fft.rfft(v.permute(0, 2, 3, 1), n=n)  # [b, h, dv, n/2+1]
        ff = torch.fft.rfft(f, n=n).unsqueeze(0).unsqueeze(2)
        return torch.fft.irfft(fv * ff, n=n)[..., :L].permute(0, 3, 1, 2)
    check_example("long_conv_hyena", L, ref)


def test_sdpa_agrees_on_causal_gqa():
    """The same numbers as PyTorch's own scaled_dot_product_attention."""
    m = mixc.Mixer("mixer g { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }")
    q, k, v = torch.randn(2, 77, 4, 32), torch.randn(2, 77, 2, 32), torch.randn(2, 77, 2, 32)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        is_causal=True).transpose(1, 2)
    assert rel(m(q, k, v), want) < 1e-5


def test_batch_and_length_vary_without_a_new_mixer():
    m = mixc.Mixer("mixer c { heads = 2; head_dim = 16; mask = causal; }")
    for b, L in [(1, 5), (3, 64), (2, 200)]:
        o = m(torch.randn(b, L, 2, 16), torch.randn(b, L, 2, 16), torch.randn(b, L, 2, 16))
        assert o.shape == (b, L, 2, 16)


def test_decode_steps_against_a_kv_cache_equal_the_full_causal_run():
    """One query at a time against the growing cache (the queries are the
    newest positions by default) gives the full run's rows."""
    m = mixc.Mixer(example("causal_gqa_llama3"), threads=2)
    info = m.info
    h, kvh, d = info["heads"], info["kv_heads"], info["head_dim"]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, n, d, generator=gen) for n in (h, kvh, kvh))
    full = m(q, k, v)
    for t in (0, 17, 39):
        step = m(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1])
        assert step.shape == (1, 1, h, info["value_dim"])
        assert rel(step, full[:, t:t + 1]) < 1e-5, t
    # A chunk of a chunked prefill, and an explicit offset.
    assert rel(m(q[:, 24:32], k[:, :32], v[:, :32]), full[:, 24:32]) < 1e-5
    assert rel(m(q[:, 24:32], k, v, q_offset=24), full[:, 24:32]) < 1e-5
    with pytest.raises(ValueError, match="q_offset"):
        m(q[:, :2], k, v, q_offset=-1)


def test_cross_attention_forward_and_grads_match_dense_torch():
    """Queries and keys of different lengths, both ways, with gradients."""
    m = mixc.Mixer("mixer x { heads = 4; kv_heads = 2; head_dim = 16; value_dim = 8; mask = all; }")
    gen = torch.Generator().manual_seed(5)
    for lq, lk in [(23, 61), (61, 23)]:
        q = torch.randn(2, lq, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, lk, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, lk, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        d_o = torch.randn(2, lq, 4, 8, generator=gen, dtype=torch.float64)
        softmax_ref(q, k, v).backward(d_o)
        ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
        got = m(*ins)
        assert got.shape == (2, lq, 4, 8)
        got.backward(d_o.float())
        assert rel(got, softmax_ref(q, k, v)) < 2e-4
        for a, b in zip(ins, (q, k, v)):
            assert rel(a.grad, b.grad) < 5e-4, (lq, lk)
    with pytest.raises(ValueError, match=r"`k` has shape \[2, 61, 2, 16\], expected \[2, 60, 2, 16\]"):
        m(torch.randn(2, 5, 4, 16), torch.randn(2, 61, 2, 16), torch.randn(2, 60, 2, 8))


def test_bf16_inputs_give_bf16_outputs_and_grads():
    m = mixc.Mixer("mixer c { heads = 2; head_dim = 16; mask = causal; }")
    q, k, v = (torch.randn(1, 20, 2, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = m(q, k, v)
    assert o.dtype == torch.bfloat16
    o.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_bf16_tensors_use_bf16_products_where_the_cpu_has_them():
    # Causal softmax at 70 positions (two 64-key tiles), against SDPA in f64
    # on the same (bf16) values: within the bf16 tolerance (1e-2 of max |o|).
    m = mixc.Mixer("mixer c { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 70, 4, 32, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 70, 2, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    o = m(q, k, v).double()
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert rel(o, want) < 1e-2
    # The same values as f32 tensors take the f32 products: the two differ
    # (by rounding) exactly when this CPU multiplies bf16 in bf16.
    o32 = m(q.float(), k.float(), v.float()).double()
    assert rel(o32, want) < 2e-3
    assert (not torch.equal(o, o32.to(torch.bfloat16).double())) == mixc.cpu_bf16_products()


def test_16_bit_tensors_are_read_in_place_and_match_the_f32_run_rounded():
    """bf16 and f16 tensors of a mixer without a dtype go to the native
    forward as they are (no f32 copies) and `o` comes back in their type:
    the f32 run of the same values, rounded once (f16 takes f32 products;
    bf16 its own where the CPU has them, the f32 ones with MIXC's f32
    mixer)."""
    spec = "mixer c { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }"
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 70, 4, 32, generator=g)
    k, v = (torch.randn(2, 70, 2, 32, generator=g) for _ in range(2))
    plain, f32 = mixc.Mixer(spec), mixc.Mixer(spec, dtype="f32")
    with torch.no_grad():
        h = plain(q.half(), k.half(), v.half())
        assert h.dtype == torch.float16
        assert torch.equal(h, f32(q.half().float(), k.half().float(), v.half().float()).half())
        b = plain(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert b.dtype == torch.bfloat16
        if not mixc.cpu_bf16_products():
            assert torch.equal(b, f32(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float()).bfloat16())


def test_dtype_fixes_the_storage_type_whatever_the_tensors():
    """`Mixer(dtype=)`: a bf16 mixer on f32 tensors computes what the
    default mixer computes on the same values as bf16 tensors (rounded
    inputs, bf16 products where the CPU has them), returned as f32; an f32
    mixer on bf16 tensors computes what the default does on their f32
    upcast; f16 rounds to f16. Gradients flow in every case."""
    spec = "mixer c { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }"
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 70, 4, 32, generator=g)
    k, v = (torch.randn(1, 70, 2, 32, generator=g) for _ in range(2))
    plain = mixc.Mixer(spec)
    for name in ("bf16", torch.bfloat16):
        m = mixc.Mixer(spec, dtype=name)
        o = m(q, k, v)
        assert o.dtype == torch.float32
        want = plain(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert torch.equal(o.bfloat16(), want), name
    o = mixc.Mixer(spec, dtype="f32")(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert o.dtype == torch.bfloat16
    assert torch.equal(o, plain(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float()).bfloat16())
    o16 = mixc.Mixer(spec, dtype="f16")(q, k, v)
    assert torch.equal(o16, plain(q.half().float(), k.half().float(), v.half().float()))
    qg = q.clone().requires_grad_()
    mixc.Mixer(spec, dtype="bf16")(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with pytest.raises(ValueError, match="dtype must be"):
        mixc.Mixer(spec, dtype="int8")


def test_bad_spec_raises_spec_error_with_the_caret():
    with pytest.raises(mixc.SpecError) as e:
        mixc.Mixer("mixer bad {\n    heads = 8;\n    head_dim = 64;\n    mask = causl;\n}\n")
    msg = str(e.value)
    assert "<spec>:4:12: error: unknown mask `causl`" in msg and "^" in msg, msg
    with pytest.raises(mixc.SpecError):
        mixc.check("mixer x { heads = 2; }")
    assert mixc.check(example("alibi_bloom")).startswith("ok (softmax")


def test_wrong_inputs_name_the_tensor_and_the_shape():
    m = mixc.Mixer("mixer g { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }")
    q, v = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 2, 32)
    with pytest.raises(ValueError, match=r"`k` has shape \[2, 10, 4, 32\], expected \[2, 10, 2, 32\]"):
        m(q, torch.randn(2, 10, 4, 32), v)
    with pytest.raises(TypeError, match="has no input"):
        m(q, torch.randn(2, 10, 2, 32), v, doc=torch.zeros(2, 10))
    t5 = mixc.Mixer(example("relative_bias_t5"))
    x = torch.randn(1, 10, 8, 64)
    with pytest.raises(TypeError, match="needs input rel"):
        t5(x, x, x)
    with pytest.raises(ValueError, match=r"`rel` has shape \[8, 12\], expected \[8, 128\]"):
        t5(x, x, x, rel=torch.randn(8, 12))


def test_torch_compile_fullgraph_forward_and_backward():
    m = mixc.Mixer("mixer g { heads = 4; kv_heads = 2; head_dim = 16; mask = causal; }")

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(64, 64 + 32 + 32)

        def forward(self, x):
            b, L, _ = x.shape
            q, k, v = self.qkv(x).split([64, 32, 32], dim=-1)
            o = m(q.view(b, L, 4, 16), k.view(b, L, 2, 16), v.view(b, L, 2, 16))
            return o.reshape(b, L, 64)

    torch.manual_seed(0)
    layer = Layer()
    x = torch.randn(2, 24, 64)
    eager = layer(x)
    eager.sum().backward()
    g_eager = layer.qkv.weight.grad.clone()
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert rel(out, eager) < 1e-6
    assert rel(layer.qkv.weight.grad, g_eager) < 1e-5


class TinyLM(torch.nn.Module):
    """Two pre-norm causal transformer blocks; `attn(q, k, v)` takes
    [batch, seq, heads, dim] tensors."""

    def __init__(self, attn, vocab=32, d=32, heads=2, layers=2):
        super().__init__()
        self.attn, self.heads = attn, heads
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict(dict(
                n1=torch.nn.LayerNorm(d), qkv=torch.nn.Linear(d, 3 * d), out=torch.nn.Linear(d, d),
                n2=torch.nn.LayerNorm(d), ff=torch.nn.Sequential(
                    torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d)))))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        b, L, d = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](x)).split(d, dim=-1)
            shape = (b, L, self.heads, d // self.heads)
            o = self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape))
            x = x + blk["out"](o.reshape(b, L, d))
            x = x + blk["ff"](blk["n2"](x))
        return self.head(x)


def sdpa_attn(q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)


def test_a_small_language_model_trains_like_sdpa():
    """50 steps of a 2-layer causal LM on counting sequences: the loss falls, and
    every step's loss equals the SDPA model's (same seed) within tolerance."""
    mixer = mixc.Mixer("mixer lm { heads = 2; head_dim = 16; mask = causal; }", threads=2)
    losses = {}
    for name, attn in (("mixc", mixer), ("sdpa", sdpa_attn)):
        torch.manual_seed(0)
        model = TinyLM(attn)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        seq = []
        for _ in range(50):
            # Counting sequences with a random start and stride: every token
            # after the second follows from the two before it.
            start = torch.randint(0, 32, (8, 1), generator=gen)
            stride = torch.randint(1, 4, (8, 1), generator=gen)
            tokens = (start + stride * torch.arange(24)) % 32
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seq.append(loss.item())
        losses[name] = seq
    m, s = losses["mixc"], losses["sdpa"]
    assert sum(m[-5:]) < 0.5 * sum(m[:5]), m
    worst = max(abs(a - b) / abs(b) for a, b in zip(m, s))
    assert worst < 1e-3, (worst, m[:5], s[:5])


def test_gen_returns_the_cuda_source():
    src = mixc.gen(example("causal_gqa_llama3"), arch="sm_80", dtype="f16")
    assert 'extern "C" __global__' in src and "mixc_causal_gqa_llama3_softmax_f16" in src
    bwd = mixc.gen(example("causal_gqa_llama3"), backward=True)
    assert "mixc_causal_gqa_llama3_softmax_bf16_bwd_pre" in bwd
    with pytest.raises(ValueError, match="sm_70"):
        mixc.gen(example("causal_gqa_llama3"), arch="sm_70")
