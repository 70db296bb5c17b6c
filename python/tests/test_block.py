"""mixc.Block: a transformer block file as a torch module, checked against
the same block written in plain PyTorch (float64): Hugging Face Llama's
conventions (RMSNorm, rotate-half rotary embedding, grouped-query heads,
SwiGLU) and GPT-2's (LayerNorm, tanh GELU)."""

import math

import pytest
import torch
import torch.nn.functional as F

import mixc

LLAMA = """
mixer attn { heads = 4; kv_heads = 2; head_dim = 8; mask = causal; }
block llama { width = 24; norm = rmsnorm(1e-6); ffn = swiglu(40); rope = 10000; }
"""

GPT = """
mixer attn { heads = 2; head_dim = 12; mask = causal; }
block gpt { width = 16; norm = layernorm(1e-5); ffn = gelu(64); }
"""


def torch_block(x, p, heads, kv_heads, head_dim, norm, ffn, rope, eps, attend=None):
    """The block in plain PyTorch, parameters by their Hugging Face names."""
    b, L, w = x.shape

    def nrm(t, prefix):
        if norm == "rms":
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * p[prefix + ".weight"]
        return F.layer_norm(t, (w,), p[prefix + ".weight"], p[prefix + ".bias"], eps)

    h = nrm(x, "input_layernorm")
    q = (h @ p["self_attn.q_proj.weight"].T).view(b, L, heads, head_dim)
    k = (h @ p["self_attn.k_proj.weight"].T).view(b, L, kv_heads, head_dim)
    v = (h @ p["self_attn.v_proj.weight"].T).view(b, L, kv_heads, head_dim)
    if rope is not None:
        inv = rope ** (-torch.arange(0, head_dim, 2, dtype=x.dtype) / head_dim)
        ang = torch.arange(L, dtype=x.dtype)[:, None] * inv[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
        sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]

        def rot(t):
            t1, t2 = t[..., : head_dim // 2], t[..., head_dim // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin

        q, k = rot(q), rot(k)
    group = heads // kv_heads
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    if attend is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=1 / math.sqrt(head_dim))
    else:
        o = attend(qt, kt, vt)
    o = o.transpose(1, 2).reshape(b, L, heads * head_dim)
    y = x + o @ p["self_attn.o_proj.weight"].T
    z = nrm(y, "post_attention_layernorm")
    if ffn == "swiglu":
        a = F.silu(z @ p["mlp.gate_proj.weight"].T) * (z @ p["mlp.up_proj.weight"].T)
    else:
        a = F.gelu(z @ p["mlp.up_proj.weight"].T, approximate="tanh")
    return y + a @ p["mlp.down_proj.weight"].T


CASES = [
    (LLAMA, dict(heads=4, kv_heads=2, head_dim=8, norm="rms", ffn="swiglu", rope=10000.0, eps=1e-6)),
    (GPT, dict(heads=2, kv_heads=2, head_dim=12, norm="layer", ffn="gelu", rope=None, eps=1e-5)),
]


@pytest.mark.parametrize("spec,conf", CASES, ids=["llama", "gpt"])
@pytest.mark.parametrize("L", [1, 37])
def test_block_matches_the_same_block_in_pytorch(spec, conf, L):
    torch.manual_seed(L)
    block = mixc.Block(spec, ranks=2 if L > 1 else 1, block_rows=16)
    x = torch.randn(2, L, block.width, requires_grad=True)
    out = block(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()

    params = {n: t.detach().double().requires_grad_() for n, t in block.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    want = torch_block(x64, params, **conf)
    (want * g.double()).sum().backward()
    scale = want.abs().max().item()
    assert (out.double() - want).abs().max().item() <= 2e-5 * scale
    pairs = [("x", x.grad, x64.grad)] + [(n, p.grad, params[n].grad) for n, p in block.named_parameters()]
    # A gradient that is 0 in exact arithmetic (dq and dk with one key) is
    # judged against a thousandth of the largest one, not its own rounding.
    floor = 1e-3 * max(ref.abs().max().item() for _, _, ref in pairs)
    for name, got, ref in pairs:
        s = max(ref.abs().max().item(), floor)
        err = (got.double() - ref).abs().max().item() / s
        assert err <= 1e-4, f"gradient of {name}: {err:.2e}"


def test_block_parameters_carry_hugging_face_names_and_load():
    block = mixc.Block(LLAMA)
    names = sorted(n for n, _ in block.named_parameters())
    assert names == sorted([
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    ])
    assert tuple(block.self_attn.k_proj.weight.shape) == (16, 24)
    other = mixc.Block(LLAMA, seed=1)
    x = torch.randn(1, 9, 24)
    assert not torch.equal(block(x), other(x))
    other.load_state_dict(block.state_dict())
    assert torch.equal(block(x), other(x))
    with torch.no_grad():
        ref = mixc.Block(LLAMA, device="reference")
        ref.load_state_dict(block.state_dict())
        assert torch.allclose(ref(x), block(x), atol=1e-5)


def test_block_refuses_bad_inputs():
    block = mixc.Block(GPT)
    with pytest.raises(ValueError, match=r"`x` must be \[batch, seq, 16\]"):
        block(torch.randn(1, 5, 8))
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(1, 5, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one"):
        block(torch.randn(1, 0, 16))
    with pytest.raises(mixc.SpecError, match="block"):
        mixc.Block("mixer a { heads = 2; head_dim = 4; }\nblock b { width = 0; norm = rmsnorm; ffn = gelu(4); }")


DOCS = """
mixer attn {
    heads = 4; kv_heads = 2; head_dim = 8;
    input doc: i32[batch, seq];
    input slopes: f32[heads];
    bias = -slopes[h] * (i - j);
    mask = causal && segment(doc);
}
block packed { width = 24; norm = rmsnorm(1e-6); ffn = swiglu(40); rope = 10000; }
"""


def test_block_passes_the_mixers_inputs_and_returns_their_gradients():
    """Packed documents (segment ids) and a learned ALiBi-style slope table:
    the block equals the PyTorch block with the same mask and bias, and the
    slopes get their gradient."""
    torch.manual_seed(0)
    block = mixc.Block(DOCS, block_rows=8)
    b, L = 2, 19
    x = torch.randn(b, L, 24, requires_grad=True)
    doc = torch.tensor([[0] * 7 + [1] * 12, [0] * 19], dtype=torch.int32)
    slopes = torch.rand(4, requires_grad=True)
    out = block(x, doc=doc, slopes=slopes)
    g = torch.randn_like(out)
    (out * g).sum().backward()

    params = {n: t.detach().double() for n, t in block.named_parameters()}
    s64 = slopes.detach().double().requires_grad_()
    pos = torch.arange(L)
    allowed = (pos[None, :] <= pos[:, None])[None] & (doc[:, :, None] == doc[:, None, :])  # [b, i, j]
    bias = -s64[None, :, None, None] * (pos[:, None] - pos[None, :]).double()[None, None]
    mask = torch.where(allowed[:, None], bias, torch.tensor(float("-inf"), dtype=torch.float64))

    def attend(qt, kt, vt):
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=1 / math.sqrt(8))

    x64 = x.detach().double().requires_grad_()
    want = torch_block(x64, params, heads=4, kv_heads=2, head_dim=8, norm="rms", ffn="swiglu",
                       rope=10000.0, eps=1e-6, attend=attend)
    (want * g.double()).sum().backward()
    assert (out.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    for name, got, ref in [("x", x.grad, x64.grad), ("slopes", slopes.grad, s64.grad)]:
        err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-4, f"gradient of {name}: {err:.2e}"
    with pytest.raises(TypeError, match="needs input doc"):
        block(x, slopes=slopes)
    with pytest.raises(ValueError, match=r"`doc` has shape \[2, 5\], expected \[2, 19\]"):
        block(x, doc=doc[:, :5], slopes=slopes)


def test_block_compiles_fullgraph_and_trains_as_eager():
    """`mixc.Block` is a `torch.library` op (`mixc::block`, with a fake
    implementation and a registered backward): a model of two blocks and a
    linear head compiles with `fullgraph=True` (no graph break) and its
    output and every gradient equal eager's; what the backward keeps (q, k,
    v, o and the statistic) are tensors autograd saves, and a block called
    without gradients keeps none."""
    torch.manual_seed(3)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b1 = mixc.Block(DOCS, block_rows=8)
            self.b2 = mixc.Block(DOCS, block_rows=8, seed=1)
            self.head = torch.nn.Linear(24, 5)

        def forward(self, x, doc, slopes):
            return self.head(self.b2(self.b1(x, doc=doc, slopes=slopes), doc=doc, slopes=slopes))

    model = Model()
    x = torch.randn(2, 19, 24, requires_grad=True)
    doc = torch.tensor([[0] * 7 + [1] * 12, [0] * 19], dtype=torch.int32)
    slopes = torch.rand(4, requires_grad=True)

    def step(fn):
        model.zero_grad()
        x.grad = slopes.grad = None
        out = fn(x, doc, slopes)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), x.grad.clone(), slopes.grad.clone(), grads

    eager = step(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = step(compiled)
    assert torch.allclose(got[0], eager[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got[1], eager[1], rtol=1e-4, atol=1e-6)
    assert torch.allclose(got[2], eager[2], rtol=1e-4, atol=1e-6)
    assert eager[3].keys() == got[3].keys() and len(got[3]) == 2 * 9 + 2
    for n in eager[3]:
        assert torch.allclose(got[3][n], eager[3][n], rtol=1e-4, atol=1e-6), n

    # The op under torch.library's own checks (fake tensors, schema, autograd registration).
    block = mixc.Block(GPT)
    xs = torch.randn(1, 6, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.mixc.block.default,
                          (block._handle, xs, [], block._weights(), True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # Inference keeps nothing.
    with torch.no_grad():
        out, saved = torch.ops.mixc.block(block._handle, xs, [], block._weights(), False)
    assert saved == [] and out.shape == xs.shape
