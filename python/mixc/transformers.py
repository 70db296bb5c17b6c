"""Hugging Face transformers models with mixc attention.

    import mixc.transformers
    mixc.transformers.register()                       # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mixc")

`register(name="mixc")` adds mixc to transformers' attention registry
(`AttentionInterface`) and its mask registry (`AttentionMaskInterface`).
Every attention layer of a model built with `attn_implementation=name` then
runs through a `mixc.Mixer` whose spec is written from what the layer passes:

- heads, kv heads (GQA) and head dims from the tensors' shapes;
- `scaling` as the spec's `scale`;
- causal or bidirectional from the layer (`is_causal`);
- `sliding_window=W` (Mistral, Gemma-2 local layers) as `window(W)`
  (transformers' window: key `j` is seen from query `i` when `i - j < W`,
  which is mixc's `window`);
- `softcap=C` (Gemma-2) as `transform = C * tanh(s / C)`;
- a padding mask (`attention_mask` of 0/1 per token) as a per-key condition
  `keep[b][j] > 0.5` on top, fed the mask as an input tensor;
- any other mask transformers builds (packed sequences through
  `position_ids`, custom `or`/`and` mask functions, a mask the caller gives
  already in 4D) as a per-(query, key) table read by a condition: correct
  for any pattern, but O(seq x kv_seq) memory, as SDPA with a mask is.

A step with a KV cache (generation) passes the new queries against the
cached keys; mixc places them as the last positions (bottom-right), as
transformers does. Mixers are compiled once per distinct layer shape and
reused by every layer and call. Attention dropout is refused (mixc has no
dropout); `output_attentions` gets no weights (None), as with SDPA.
"""

import torch

from . import Mixer

__all__ = ["register", "attention_forward", "mask"]

# One compiled mixer per spec text (layer shapes, scale, mask kind, dtype).
_MIXERS = {}


def _mixer(text):
    m = _MIXERS.get(text)
    if m is None:
        m = _MIXERS[text] = Mixer(text)
    return m


def _number(x):
    """A float as spec text (repr round-trips every f64)."""
    return repr(float(x))


def _spec(heads, kv_heads, head_dim, value_dim, dtype, scale, causal, window, softcap, keep, dense_rows):
    items = [
        f"heads = {heads};",
        f"kv_heads = {kv_heads};",
        f"head_dim = {head_dim};",
        f"value_dim = {value_dim};",
        f"dtype = {dtype};",
        f"scale = {_number(scale)};",
    ]
    mask = []
    if causal:
        mask.append("causal")
    if window is not None:
        mask.append(f"window({int(window)})")
    if keep:
        items.append("input keep: f32[batch, seq];")
        mask.append("keep[b][j] > 0.5")
    if dense_rows is not None:
        # Row `i - (kv_seq - seq)` of the table is query `i`'s (queries are
        # the last `seq` positions).
        items.append(f"input allowed: f32[batch, {dense_rows}, seq];")
        mask.append("allowed[b][i - kv_seq + seq][j] > 0.5")
    items.append(f"mask = {' && '.join(mask) if mask else 'all'};")
    if softcap is not None:
        c = _number(softcap)
        items.append(f"transform = {c} * tanh(s / {c});")
    items.append("norm = softmax;")
    body = "\n    ".join(items)
    return f"mixer hf_attention {{\n    {body}\n}}\n"


_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: query `[batch, heads,
    q_len, head_dim]`, key and value `[batch, kv_heads, kv_len, dim]`;
    returns `(o [batch, q_len, heads, value_dim], None)`."""
    if dropout:
        raise NotImplementedError(
            f"mixc attention has no dropout (the layer asks for {dropout}); "
            "set the config's attention_dropout to 0.0")
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("mixc attention: position_bias / attention sinks are not mapped yet; "
                                  "write the mixer as a spec and call mixc.Mixer directly")
    b, heads, q_len, head_dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[3]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # A single new query against a cache sees every cached key (and the
    # window below); only longer query blocks need the causal mask, but it
    # is exact either way with bottom-right alignment.
    if scaling is None:
        scaling = head_dim ** -0.5
    keep = dense = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            keep = attention_mask[:, -kv_len:].to(torch.float32)
        elif attention_mask.dim() == 4:
            am = attention_mask
            if am.dtype != torch.bool:
                am = am == 0  # an additive float mask: 0 where seen
            if am.shape[1] != 1:
                raise NotImplementedError("mixc attention: a per-head 4D mask is not mapped")
            dense = am[:, 0].expand(b, q_len, kv_len).to(torch.float32)
            # The dense mask says everything transformers' mask function
            # said, causality and window included.
            is_causal, sliding_window = False, None
        else:
            raise ValueError(f"mixc attention: an attention mask of shape {list(attention_mask.shape)} "
                             "is neither [batch, kv_len] nor [batch, 1, q_len, kv_len]")
    dtype = _DTYPES.get(query.dtype)
    if dtype is None:
        raise TypeError(f"mixc attention runs f32, bf16 and f16 tensors, not {query.dtype}")
    text = _spec(heads, kv_heads, head_dim, value_dim, dtype, scaling, bool(is_causal) and dense is None,
                 sliding_window, softcap, keep is not None, None if dense is None else q_len)
    m = _mixer(text)
    extra = {}
    if keep is not None:
        extra["keep"] = keep
    if dense is not None:
        extra["allowed"] = dense
    o = m(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **extra)
    return o, None


def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
         allow_is_causal_skip=True, allow_is_bidirectional_skip=False, **kwargs):
    """transformers' mask-function signature. For the standard patterns
    (causal or bidirectional, with or without a sliding window, which the
    attention call gets from the layer itself) it returns the 2D padding
    mask `[batch, kv_length]` or None when nothing is padded; for anything
    else it returns transformers' own dense boolean mask."""
    if allow_is_causal_skip or allow_is_bidirectional_skip:
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        if attention_mask.shape[1] == kv_length:
            return attention_mask
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def register(name="mixc"):
    """Registers mixc with transformers under `name`, so models built with
    `attn_implementation=name` use it. Returns `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask)
    return name
