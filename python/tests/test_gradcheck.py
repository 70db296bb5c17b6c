"""`torch.autograd.gradcheck` of the `mixc::mix` op, one spec per family,
on f64 tensors at tiny shapes; and `mixc.tune` over the library's tuning
session.

The CPU backend computes in f32 (f64 tensors are rounded on the way in and
the output rounded on the way out), so the numerical Jacobian uses a step
of 1e-3 (the rounding then moves a difference quotient by about 3e-5) and
the tolerances suit f32 outputs of a few units (atol 1e-3, rtol 2e-3): a
wrong backward formula is off by O(1), far outside them (the last test
shows a 1% error in one gradient is caught)."""

import json
import os

import pytest
import torch

import mixc

SPECS = {
    "softmax": """mixer gc_softmax {
        heads = 2; kv_heads = 1; head_dim = 3; value_dim = 2;
        input rel: f32[heads, 8];
        bias = rel[h][min(i - j, 7)];
        mask = causal && window(4);
    }""",
    "linear": """mixer gc_linear {
        heads = 2; head_dim = 3;
        score = dot(elu1(q), elu1(k)); mask = causal; norm = sum(eps = 1e-6);
    }""",
    "retention": """mixer gc_retention {
        heads = 2; head_dim = 3; value_dim = 2;
        score = dot(q, k); scale = 0.5; decay = 1.0 - pow(2.0, -2.0 - h); mask = causal; norm = none;
    }""",
    "gated": """mixer gc_gated {
        heads = 2; head_dim = 3;
        input g: f32[batch, seq, heads];
        score = dot(q, k); scale = 1.0; decay = gate(g); mask = causal; norm = none;
    }""",
    "convolution": """mixer gc_conv {
        heads = 2; head_dim = 3;
        input f: f32[heads, seq];
        score = filter(f); mask = causal; norm = none;
    }""",
}


@pytest.mark.parametrize("family", sorted(SPECS))
def test_gradcheck_in_f64_per_family(family):
    m = mixc.Mixer(SPECS[family], threads=1)
    info = m.info
    assert info["family"] == family
    gen = torch.Generator().manual_seed(3)
    b, L = 2, 6
    h, kvh, dk, dv = info["heads"], info["kv_heads"], info["head_dim"], info["value_dim"]

    def leaf(*shape, lo=None):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if lo is not None:
            t = lo + (1 - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)
        return t.requires_grad_()

    v = leaf(b, L, kvh, dv)
    extra = {}
    for spec_in in info["inputs"]:
        shape = [b if d == "batch" else L if d == "seq" else d for d in spec_in["dims"]]
        extra[spec_in["name"]] = leaf(*shape, lo=0.8 if spec_in["name"] == "g" else None)
    names = list(extra)
    if info["reads_qk"]:
        q, k = leaf(b, L, h, dk), leaf(b, L, kvh, dk)
        inputs = (q, k, v, *extra.values())

        def fn(q, k, v, *ex):
            return m(q, k, v, **dict(zip(names, ex)))
    else:
        inputs = (v, *extra.values())

        def fn(v, *ex):
            return m(None, None, v, **dict(zip(names, ex)))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=1e-3, rtol=2e-3, check_batched_grad=False)


def test_gradcheck_fails_on_a_wrong_gradient():
    # The tolerances above catch a wrong backward: dq off by 1%.
    m = mixc.Mixer(SPECS["linear"], threads=1)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))

    class Skewed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda q, k, v: m(Skewed.apply(q), k, v), (q, k, v), eps=1e-3, atol=1e-3,
                                 rtol=2e-3, check_batched_grad=False)


def test_tune_stores_an_entry_that_the_next_call_hits(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXC_CACHE_DIR", str(tmp_path))
    spec = SPECS["softmax"].replace("gc_softmax", "gc_tuned")
    first = mixc.tune(spec, 64, batch=1, budget=2.0, reps=1)
    assert first["result"] == "tuned"
    entry = first["entry"]
    assert entry["key"]["spec_name"] == "gc_tuned"
    assert entry["tuned_seq"] == 64 and entry["timed"] >= 1
    assert first["path"] and os.path.exists(first["path"])
    with open(first["path"]) as f:
        assert json.load(f)["chosen_label"] == entry["chosen_label"]
    again = mixc.tune(spec, 64, batch=1)
    assert again["result"] == "cache_hit" and again["entry"]["chosen_label"] == entry["chosen_label"]
    assert mixc.tune(spec, 64, force=True, budget=0.0, reps=1)["result"] == "tuned"
    with pytest.raises(ValueError, match="budget"):
        mixc.tune(spec, 64, budget=-1.0)
    with pytest.raises(mixc.SpecError):
        mixc.tune("mixer broken { heads = ; }", 64)


def test_explicit_cpu_tiles_give_the_same_result():
    spec = SPECS["softmax"].replace("gc_softmax", "gc_tiles")
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 70, 2, 3, generator=g)
    k = torch.randn(1, 70, 1, 3, generator=g)
    v = torch.randn(1, 70, 1, 2, generator=g)
    rel = torch.randn(2, 8, generator=g)
    want = mixc.Mixer(spec)(q, k, v, rel=rel)
    for config in ({"block_m": 16, "block_n": 32}, {"block_m": 8, "block_n": 8, "chunk": 16}):
        got = mixc.Mixer(spec, config=config)(q, k, v, rel=rel)
        assert torch.allclose(got, want, atol=1e-5), config
    with pytest.raises(ValueError, match="block_m, block_n and chunk"):
        mixc.Mixer(spec, config={"tile": 4})
    with pytest.raises(ValueError, match="at least 1"):
        mixc.Mixer(spec, config={"block_m": 0})
    with pytest.raises(TypeError, match="dict"):
        mixc.Mixer(spec, config=64)
