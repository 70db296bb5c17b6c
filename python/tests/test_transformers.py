"""Hugging Face transformers models with `attn_implementation="mixc"`
against the same models (same weights) with transformers' own attention:
logits, parameter gradients, padding, packed sequences, generation."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mixc.transformers  # noqa: E402

NAME = mixc.transformers.register()


def _pair(config_cls, peer, **cfg):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                attention_dropout=0.0)
    base.update(cfg)
    # One config object each: a model keeps (and from_config sets) its
    # config's attention implementation.
    ref = transformers.AutoModelForCausalLM.from_config(config_cls(**base), attn_implementation=peer).float()
    ours = transformers.AutoModelForCausalLM.from_config(config_cls(**base), attn_implementation=NAME).float()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == NAME
    assert ref.config._attn_implementation == peer
    return ref, ours


def _close(a, b, tol, what):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{what}: max error {err:.3g} against max {scale:.3g}"


def _logits_and_grads(model, ids, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _compare(ref, ours, ids, tol=2e-4, rows=None, **kw):
    lr, gr = _logits_and_grads(ref, ids, **kw)
    lo, go = _logits_and_grads(ours, ids, **kw)
    if rows is not None:
        lr, lo = lr[rows], lo[rows]
    _close(lo, lr, tol, "logits")
    assert gr.keys() == go.keys()
    for n in gr:
        _close(go[n], gr[n], 5 * tol, f"grad of {n}")
    return lo


def _calls(monkeypatch):
    """Counts mixc attention calls (to show the layers did run through mixc)."""
    seen = []
    real = mixc.transformers.attention_forward

    def counting(*a, **k):
        seen.append(1)
        return real(*a, **k)

    transformers.AttentionInterface.register(NAME, counting)
    monkeypatch.setattr(mixc.transformers, "attention_forward", counting)
    return seen


@pytest.fixture(autouse=True)
def _registered():
    yield
    mixc.transformers.register()


def test_llama_logits_and_gradients_match_sdpa(monkeypatch):
    ref, ours = _pair(transformers.LlamaConfig, "sdpa")
    seen = _calls(monkeypatch)
    ids = torch.randint(0, 97, (2, 37))
    _compare(ref, ours, ids)
    assert len(seen) == 2, "both layers run through mixc"


def test_llama_with_left_padding_matches_sdpa():
    ref, ours = _pair(transformers.LlamaConfig, "sdpa")
    ids = torch.randint(0, 97, (2, 29))
    am = torch.ones(2, 29, dtype=torch.long)
    am[0, :7] = 0  # row 0 is left-padded by 7 tokens
    lr = ref(input_ids=ids, attention_mask=am).logits
    lo = ours(input_ids=ids, attention_mask=am).logits
    _close(lo[0, 7:], lr[0, 7:], 2e-4, "padded row")
    _close(lo[1], lr[1], 2e-4, "full row")


def test_packed_sequences_use_the_dense_mask():
    # position_ids that restart mark packed sequences (without a cache):
    # transformers builds a block-diagonal causal mask, which mixc reads as
    # a table.
    ref, ours = _pair(transformers.LlamaConfig, "sdpa")
    ids = torch.randint(0, 97, (1, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    lr = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    lo = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
    _close(lo, lr, 2e-4, "packed logits")
    assert any("allowed" in text for text in mixc.transformers._MIXERS)
    # The packing matters: with a cache transformers does not look for
    # packing, and the second sequence then sees the first.
    unpacked = ref(input_ids=ids, position_ids=pos, use_cache=True).logits
    assert (unpacked[0, 12:] - lo[0, 12:]).abs().max() > 1e-3
    _close(unpacked[0, :12], lo[0, :12], 2e-4, "first sequence")


def test_mistral_sliding_window_matches_sdpa():
    ref, ours = _pair(transformers.MistralConfig, "sdpa", sliding_window=8)
    ids = torch.randint(0, 97, (2, 41))
    lo = _compare(ref, ours, ids)
    # The window matters at this length: the same weights without it differ.
    _, wide = _pair(transformers.MistralConfig, "sdpa", sliding_window=None)
    assert (wide(input_ids=ids).logits - lo).abs().max() > 1e-3


def test_gemma2_softcap_and_local_layers_match_eager():
    ref, ours = _pair(transformers.Gemma2Config, "eager", sliding_window=8, attn_logit_softcapping=5.0,
                      final_logit_softcapping=None, head_dim=16, query_pre_attn_scalar=16,
                      layer_types=["sliding_attention", "full_attention"])
    ids = torch.randint(0, 97, (2, 33))
    _compare(ref, ours, ids)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generation_with_a_kv_cache_matches_sdpa(family):
    cls, cfg = {"llama": (transformers.LlamaConfig, {}),
                "mistral": (transformers.MistralConfig, {"sliding_window": 5})}[family]
    ref, ours = _pair(cls, "sdpa", **cfg)
    ids = torch.randint(1, 97, (2, 11))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # row 1 left-padded
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert got.shape == (2, 19)
    assert torch.equal(got, want)


def test_dropout_is_refused():
    _, ours = _pair(transformers.LlamaConfig, "sdpa", attention_dropout=0.1)
    ours.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        ours(input_ids=torch.randint(0, 97, (1, 5)))
