"""FlexAttention parity from Python: the score_mod / mask_mod functions of
PyTorch's own FlexAttention tests, run by `torch.nn.attention.flex_attention`
(eager, on the CPU) and by the same mods written as mixc specs. FlexAttention
has no backward on the CPU, so gradients (of q, k, v and of the learned
tables) are checked against autograd through the same mods applied to a
dense score matrix, whose forward is first checked against FlexAttention."""

import math

import pytest
import torch

import mixc

flex = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, L, D = 2, 4, 67, 16


def _prefix(b, h, q, kv, t):
    return kv <= t["prefix"][b]


# name: (mixc items, score_mod(score, b, h, q, kv, tables) or None,
#        mask_mod(b, h, q, kv, tables) or None, tables {name: tensor})
CASES = {
    "times_two": ("transform = s * 2.0;", lambda s, b, h, q, kv, t: s * 2, None, {}),
    "squared": ("transform = s * s;", lambda s, b, h, q, kv, t: s * s, None, {}),
    "causal": ("mask = j <= i;", None, lambda b, h, q, kv, t: q >= kv, {}),
    "inverse_causal": ("mask = i <= j;", None, lambda b, h, q, kv, t: q <= kv, {}),
    "rel_bias": ("bias = i - j;", lambda s, b, h, q, kv, t: s + (q - kv), None, {}),
    "rel_causal": (
        "bias = i - j; mask = causal;",
        lambda s, b, h, q, kv, t: s + (q - kv),
        lambda b, h, q, kv, t: q >= kv,
        {},
    ),
    "alibi": (
        "bias = (j - i) * pow(2.0, -(h + 1) * 8.0 / 4.0);",
        lambda s, b, h, q, kv, t: s + (kv - q) * torch.exp2(-((h + 1) * 8.0 / H)),
        None,
        {},
    ),
    "head_offset": (
        "input off: f32[heads]; transform = s * off[h];",
        lambda s, b, h, q, kv, t: s * t["off"][h],
        None,
        {"off": lambda g: torch.rand(H, generator=g)},
    ),
    "trig": (
        "transform = sin(cos(s)) + sin(1.0 * b) / cos(1.0 * b);",
        lambda s, b, h, q, kv, t: torch.sin(torch.cos(s)) + torch.tan(b),
        None,
        {},
    ),
    "trig2": (
        "transform = cos(s) * sin(s) + sin(1.0 * b) / cos(1.0 * b);",
        lambda s, b, h, q, kv, t: torch.cos(s) * torch.sin(s) + torch.tan(b),
        None,
        {},
    ),
    "windowed": ("mask = i + 3 >= j;", None, lambda b, h, q, kv, t: q + 3 >= kv, {}),
    "prefix_lm": (
        "input prefix: f32[batch]; mask = j <= int(prefix[b]) || j <= i;",
        None,
        lambda b, h, q, kv, t: (kv <= t["prefix"][b]) | (kv <= q),
        {"prefix": lambda g: torch.tensor([5.0, 23.0])},
    ),
    "document": (
        "input doc: f32[batch, seq]; mask = doc[b][i] == doc[b][j];",
        None,
        lambda b, h, q, kv, t: t["doc"][b, q] == t["doc"][b, kv],
        {"doc": lambda g: (torch.arange(L) // 11).float().expand(B, L).contiguous()},
    ),
    "sliding_window": (
        "mask = j <= i && i - j <= 8;",
        None,
        lambda b, h, q, kv, t: (kv <= q) & (q - kv <= 8),
        {},
    ),
    "softcap": (
        "transform = 0.5 * tanh(s / 0.5);",
        lambda s, b, h, q, kv, t: 0.5 * torch.tanh(s / 0.5),
        None,
        {},
    ),
    "batch_head_bias": (
        "input bh: f32[batch, heads]; bias = bh[b][h];",
        lambda s, b, h, q, kv, t: s + t["bh"][b, h],
        None,
        {"bh": lambda g: torch.randn(B, H, generator=g)},
    ),
    "per_head_window": (
        "mask = j <= i && i - j < 8 * (h + 1);",
        None,
        lambda b, h, q, kv, t: (kv <= q) & (q - kv < 8 * (h + 1)),
        {},
    ),
    "dilation": ("mask = (i - j) % 4 == 0;", None, lambda b, h, q, kv, t: (q - kv) % 4 == 0, {}),
}


def _flex(case, q, k, v, tables):
    items, score_mod, mask_mod, _ = CASES[case]
    sm = (lambda s, b, h, i, j: score_mod(s, b, h, i, j, tables)) if score_mod else None
    bm = None
    if mask_mod is not None:
        bm = flex.create_block_mask(
            lambda b, h, i, j: mask_mod(b, h, i, j, tables), B, H, L, L, device="cpu"
        )
    # flex_attention takes [b, h, L, d].
    o = flex.flex_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=sm, block_mask=bm
    )
    return o.transpose(1, 2)


def _dense(case, q, k, v, tables):
    """The same mods on the whole [B, H, L, L] score matrix, with autograd."""
    _, score_mod, mask_mod, _ = CASES[case]
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    idx = (
        torch.arange(B).view(B, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(L).view(1, 1, L, 1),
        torch.arange(L).view(1, 1, 1, L),
    )
    if score_mod is not None:
        s = score_mod(s, *idx, tables)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(*idx, tables).expand_as(s), float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))  # a row with no key: 0
    return torch.einsum("bhij,bjhd->bihd", p, v)


@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_attention_mods_match_mixc_forward_and_backward(case):
    items, _, _, make = CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v = (torch.randn(B, L, H, D, generator=gen) for _ in range(3))
    d_o = torch.randn(B, L, H, D, generator=gen)
    tables = {n: f(gen) for n, f in make.items()}
    learn = {n for n in tables if n in ("off", "bh")}
    m = mixc.Mixer(f"mixer {case} {{ heads = {H}; head_dim = {D}; dtype = f32; {items} }}", threads=2)
    # Forward: PyTorch's FlexAttention (eager: its unfused path) and mixc.
    with torch.no_grad():
        want = _flex(case, q, k, v, tables)
        scale = want.abs().max().item()
        assert (m(q, k, v, **tables) - want).abs().max().item() <= 2e-4 * scale, case
    # Backward: autograd through the dense form of the same mods.
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    tw = {n: (t.clone().requires_grad_() if n in learn else t) for n, t in tables.items()}
    dense = _dense(case, *ins, tw)
    assert (dense.detach() - want).abs().max().item() <= 1e-4 * scale, case
    dense.backward(d_o)
    got_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    tg = {n: (t.clone().requires_grad_() if n in learn else t) for n, t in tables.items()}
    m(*got_ins, **tg).backward(d_o)
    pairs = list(zip(got_ins, ins)) + [(tg[n], tw[n]) for n in learn]
    largest = max(w.grad.abs().max().item() for _, w in pairs)
    for g, w in pairs:
        err = (g.grad - w.grad).abs().max().item()
        assert err <= 1e-3 * largest, (case, err, largest)


def test_rows_without_keys_are_zero_as_in_flex_attention():
    """`j < i`: row 0 sees nothing; FlexAttention and mixc both give 0."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=gen) for _ in range(3))
    m = mixc.Mixer("mixer p { heads = 2; head_dim = 8; dtype = f32; mask = j < i; }")
    o = m(q, k, v)
    assert torch.all(o[:, 0] == 0)
    bm = flex.create_block_mask(lambda b, h, i, j: j < i, 1, 2, 9, 9, device="cpu")
    want = flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)
    assert (o - want.transpose(1, 2)).abs().max().item() < 1e-5


def test_additive_neg_inf_bias_masks_like_hugging_face():
    """A Hugging Face style additive mask (0 / -inf per key) as a bias table."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=gen) for _ in range(3))
    am = torch.zeros(2, 12)
    am[1, 5:] = float("-inf")
    m = mixc.Mixer("mixer a { heads = 2; head_dim = 8; dtype = f32; input am: f32[batch, seq]; bias = am[b][j]; }")
    o = m(q, k, v, am=am)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8) + am[:, None, None, :]
    want = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    assert (o - want).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="NaN"):
        m(q, k, v, am=torch.full((2, 12), float("nan")))


def test_spec_warnings_are_python_warnings():
    """A valid spec with a likely mistake (a `batch` table read without `b`)
    warns; one without does not."""
    bad = "mixer w { heads = 2; head_dim = 8; input t: f32[batch, heads]; bias = t[0][h]; }"
    with pytest.warns(UserWarning, match="does not read `b`"):
        mixc.Mixer(bad)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixc.Mixer(bad.replace("t[0][h]", "t[b][h]"))
