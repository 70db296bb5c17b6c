"""mixc: token mixers (attention and its relatives) from a short spec, as
differentiable PyTorch operators.

    import mixc, torch
    attn = mixc.Mixer('''
        mixer causal_gqa { heads = 8; kv_heads = 2; head_dim = 64; mask = causal; }
    ''')
    q = torch.randn(2, 100, 8, 64, requires_grad=True)   # [batch, seq, heads, head_dim]
    k = torch.randn(2, 100, 2, 64, requires_grad=True)   # [batch, seq, kv_heads, head_dim]
    v = torch.randn(2, 100, 2, 64, requires_grad=True)
    o = attn(q, k, v)                                     # [batch, seq, heads, value_dim]
    o.sum().backward()                                    # q.grad, k.grad, v.grad

The spec is compiled once; every call takes any batch and sequence length.
Keys and values may be longer or shorter than the queries (a decode step
against a KV cache, a chunk of a chunked prefill, cross-attention): the
queries are then the last positions, or start at `q_offset=`.
Tensors use the flash-attn layout; extra inputs (tables, gates, filters,
segment ids) are keyword arguments by their spec names. The operator is a
`torch.library` custom op (`mixc::mix`) with a fake implementation and an
autograd formula, so models using it run under `torch.compile(fullgraph=True)`.

CPU tensors run on mixc's CPU backend, which computes in f32: contiguous
f32, bf16 and f16 inputs are read in place in the forward (16-bit ones
when they are the mixer's storage type), and the output is returned in the
inputs' dtype. CUDA tensors are not supported by the
package yet (the CLI and the Rust library run the CUDA backend).

`mixc.transformers.register()` makes mixc a Hugging Face transformers
attention implementation (`attn_implementation="mixc"`).

`mixc.Block` is a whole pre-norm transformer block (a `block` file: norms,
projections, rotary embedding, the mixer, FFN) as a `torch.nn.Module`
whose parameters carry Hugging Face Llama names, computed blockwise (the
Blockwise Parallel Transformer: memory linear in the sequence length).
"""

import os
import weakref

import torch

from . import _mixc
from ._ring import ring_shards, shard, unshard

__all__ = ["Block", "Mixer", "SpecError", "check", "cpu_bf16_products", "gen", "ring_shards", "shard", "tune",
           "unshard", "__version__"]

SpecError = _mixc.SpecError
__version__ = _mixc.__version__

# The custom op takes the mixer as an int handle (ops take tensors and
# scalars only); the handle names a live Mixer here.
_MIXERS = weakref.WeakValueDictionary()


def _spec_source(spec):
    """(text, origin) of a spec given as text or as a path to a `.mix` file."""
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and "{" not in spec and spec.strip().endswith(".mix")
    ):
        path = os.fspath(spec)
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    if not isinstance(spec, str):
        raise TypeError(f"spec must be spec text or a path to a .mix file, not {type(spec).__name__}")
    return spec, "<spec>"


def check(spec):
    """Validates a spec (text or path); returns a one-line summary or raises SpecError."""
    text, origin = _spec_source(spec)
    return _mixc.check(text, origin)


def cpu_bf16_products():
    """Whether bf16 tensors' attention products run in bf16 on this CPU
    (AVX-512 BF16, with f32 accumulation: about twice the f32 speed), else
    in f32. `MIXC_CPU_BF16=0` in the environment turns them off."""
    return _mixc.cpu_bf16_products()


def gen(spec, arch="sm_90", dtype=None, *, backward=False):
    """The generated CUDA source of a spec (text or path) for `arch`
    (`"sm_80"`, `"sm_90"`) and `dtype` (`"f16"`, `"bf16"`, `"f32"`; None: the
    spec's), default tiles, as `mixc gen` prints it; `backward=True` gives
    the backward kernels (softmax family). Needs no GPU."""
    text, origin = _spec_source(spec)
    return _mixc.gen(text, origin, arch, dtype, backward)


def tune(spec, seq, *, batch=1, backward=False, budget=10.0, reps=3, force=False, seed=0, top=5):
    """Tunes the CPU backend's tiles for a spec (text or path) at `batch x
    seq`, as `mixc tune --backend cpu` does (the same library session): a
    cached entry is returned unless `force=True`; otherwise the candidates
    are timed (`reps` each, no new one after `budget` seconds) against the
    reference and the winner stored in the tuning cache (`MIXC_CACHE_DIR`,
    else `~/.cache/mixc`), where every `Mixer` of this spec built later
    finds it for lengths in the same power-of-two bucket. `backward=True`
    tunes the backward pass. Returns a dict: `result` (`"tuned"` or
    `"cache_hit"`), `entry` (the stored entry: the chosen tiles, their and
    the default's median times, the best candidates), `path`, `warnings`."""
    import json

    text, origin = _spec_source(spec)
    return json.loads(_mixc.tune(text, origin, seq, batch, backward, budget, reps, force, seed, top))


class Mixer:
    """A spec compiled once for the CPU backend; call it on torch tensors.

    `dtype` (`"f32"`, `"bf16"`, `"f16"` or the torch dtype; default: the
    tensors') is the storage type the mixer computes on: inputs of another
    dtype are rounded to it first, and `"bf16"` takes bf16 products on CPUs
    that have them (f32 tensors included), `"f32"` keeps f32 products for
    bf16 tensors. The output keeps the inputs' dtype.
    `threads` (default: every core) and `ranks` (ring ranks inside this
    process; the result does not depend on it) are the CPU backend's.
    `device="reference"` runs the f64 reference evaluator (slow; for tests).
    `config` fixes the CPU tiles (`{"block_m": 64, "block_n": 64, "chunk":
    64}`, any subset; default: a tuned entry from `mixc.tune`, else the
    default tiles).
    `sharding` (`"zigzag"`, `"contiguous"`; default zigzag for causal
    masks) deals positions to ring ranks, those of `ranks` and those of a
    process group: `m(q, k, v, group=pg)` takes this process's shards
    (`mixc.shard`) and returns its rows of `o`, the ring running over the
    `torch.distributed` group, forward and backward.
    """

    def __init__(self, spec, *, dtype=None, threads=None, ranks=1, device="cpu", sharding=None, config=None):
        text, origin = _spec_source(spec)
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict of CPU tiles (block_m, block_n, chunk), not {config!r}")
        self.dtype = _storage_dtype(dtype)
        self._m = _mixc.Mixer(text, origin, device, threads, ranks, sharding, config)
        self.info = dict(self._m.info)
        self.name = self.info["name"]
        self._handle = id(self)
        _MIXERS[self._handle] = self

    def __repr__(self):
        return repr(self._m)

    def _qkv(self, q, k, v):
        """q, k and v as f32 holding this call's storage type's values (the
        mixer's `dtype`, else the tensors'), and whether the CPU may take
        bf16 products (bf16 storage)."""
        storage = self.dtype or v.dtype

        def f32(t):
            t = t.detach()
            if t.dtype != storage and storage in (torch.bfloat16, torch.float16):
                t = t.to(storage)
            return t.to(torch.float32).contiguous()

        return f32(q), f32(k), f32(v), storage == torch.bfloat16

    def forward_state(self, q, k, v, state=None, **extra):
        """A forward of a causal linear, retention or gated mixer that
        continues from `state` (None: nothing came before) and returns `(o,
        next_state)`: prefill once, then decode a token (or a few) at a time
        in O(d_k d_v) per token, equal to one long forward. q, k, v (and
        seq-indexed extras such as gates) are the new tokens; a state is the
        pair `(s [batch, heads, head_dim, value_dim], z [batch, heads,
        head_dim])`. Inference only (no autograd)."""
        info = self.info
        names = [i["name"] for i in info["inputs"]]
        if sorted(extra) != sorted(names):
            raise TypeError(f"mixer `{self.name}` takes inputs {names}, got {sorted(extra)}")
        extras = [extra[n] for n in names]
        _validate(self, q, k, v, extras, 0)
        if q.shape[1] != v.shape[1]:
            raise ValueError("forward_state takes the new tokens' q, k and v alike (one length)")
        b, n = v.shape[0], v.shape[1]
        h, dk, dv = info["heads"], info["head_dim"], info["value_dim"]
        if state is not None:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise TypeError("state must be the pair (s, z) a previous forward_state returned")
            _expect("state s", state[0], (b, h, dk, dv))
            _expect("state z", state[1], (b, h, dk))
            sin = tuple(_f32(t) for t in state)
        qc, kc, vc, _ = self._qkv(q, k, v)
        args, keep = _extra_args(self, extras)
        o = torch.empty((b, n, h, dv), dtype=torch.float32)
        s_out = torch.empty((b, h, dk, dv), dtype=torch.float32)
        z_out = torch.empty((b, h, dk), dtype=torch.float32)
        self._m.forward_state((b, n), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), args, o.data_ptr(),
                              None if state is None else (sin[0].data_ptr(), sin[1].data_ptr()),
                              (s_out.data_ptr(), z_out.data_ptr()))
        del keep
        return o.to(v.dtype), (s_out, z_out)

    def __call__(self, q, k, v, *, q_offset=None, group=None, cu_seqlens=None, cu_seqlens_q=None,
                 cu_seqlens_k=None, block_table=None, seq_lens=None, **extra):
        """`o [batch, seq, heads, value_dim]` for q `[batch, seq, heads,
        head_dim]`, k and v `[batch, kv_seq, kv_heads, dim]`. Query `i` sits
        at position `i + q_offset` among the keys (masks, biases and decay
        see positions); the default `kv_seq - seq` (0 when there are more
        queries than keys) makes the queries the newest tokens. Extra inputs
        are keyword arguments by their spec names; their `seq` axis spans the
        kv_seq key positions.

        A packed variable-length batch (FlashAttention's varlen): q
        `[1, total_q, heads, head_dim]`, k and v `[1, total_k, kv_heads,
        dim]`, the sequences concatenated, with `cu_seqlens_q` and
        `cu_seqlens_k` (int tensors or lists, `[n + 1]`, from 0) their
        boundaries, or `cu_seqlens` for both; each sequence attends only
        within itself, its positions restarting at 0. Extra inputs with a
        `seq` axis are packed the same way; those with a `batch` axis but no
        `seq` axis hold one entry per sequence.

        A paged KV cache (vLLM / FlashInfer layout, inference only): k and v
        `[num_pages, page_size, kv_heads, dim]`, `block_table` `[batch,
        max_pages]` (ints: row b's pages in order) and `seq_lens` (row b's
        key count); q `[batch, seq, heads, head_dim]` are each row's newest
        positions. Extra inputs must have no `seq` axis."""
        names = [i["name"] for i in self.info["inputs"]]
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise TypeError(f"mixer `{self.name}` has no input {', '.join(unknown)} (it takes {names or 'none'})")
        missing = [n for n in names if n not in extra]
        if missing:
            raise TypeError(f"mixer `{self.name}` needs input {', '.join(missing)}")
        if not self.info["reads_qk"]:
            q = v.new_empty(0) if q is None else q
            k = v.new_empty(0) if k is None else k
        extras = [extra[n] for n in names]
        if block_table is not None or seq_lens is not None:
            if block_table is None or seq_lens is None:
                raise ValueError("a paged KV cache needs both block_table and seq_lens")
            return _paged_call(self, q, k, v, extras, block_table, seq_lens)
        if cu_seqlens is not None or cu_seqlens_q is not None or cu_seqlens_k is not None:
            if group is not None or q_offset is not None:
                raise ValueError("a packed batch (cu_seqlens) takes no q_offset or group")
            cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens
            cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens
            if cu_q is None or cu_k is None:
                raise ValueError("a packed batch needs cu_seqlens, or both cu_seqlens_q and cu_seqlens_k")
            cu_q, cu_k = _cu(cu_q, "cu_seqlens_q"), _cu(cu_k, "cu_seqlens_k")
            _validate_packed(self, q, k, v, extras, cu_q, cu_k)
            o, _stat = torch.ops.mixc.mix_varlen(self._handle, q, k, v, extras, cu_q, cu_k)
            return o
        if group is not None:
            if q_offset is not None:
                raise ValueError("a ring over a process group (group=) runs queries and keys of one sequence; "
                                 "q_offset is not taken")
            from ._ring import ring_call

            return ring_call(self, q, k, v, extras, group)
        q_offset = _validate(self, q, k, v, extras, q_offset)
        o, _stat = torch.ops.mixc.mix(self._handle, q, k, v, extras, q_offset)
        return o


def _expect(name, t, shape, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, not {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"`{name}` is on {t.device}; the mixc package runs CPU tensors so far")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {list(t.shape)}, expected {list(shape)}")
    if dtype == "i32" and t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`{name}` holds {t.dtype}, expected integers (int32)")
    if dtype == "f32" and not t.is_floating_point():
        raise TypeError(f"`{name}` holds {t.dtype}, expected a floating-point tensor")


def _expect_extras(inputs, extras, batch, seq):
    """Each extra input has its declared shape (`batch` and `seq` axes bound)
    and dtype; `inputs` is a mixer info's."""
    for spec_in, t in zip(inputs, extras):
        shape = [batch if d == "batch" else seq if d == "seq" else d for d in spec_in["dims"]]
        _expect(spec_in["name"], t, shape, spec_in["dtype"])


def _lengths(m, q, v):
    """(batch, seq, kv_seq): queries from q (from v for the convolution
    family, which reads no q), keys from v."""
    seq = q.shape[1] if m.info["reads_qk"] else v.shape[1]
    return v.shape[0], seq, v.shape[1]


def _validate(m, q, k, v, extras, q_offset):
    """Checks every tensor against the spec; returns the query offset."""
    info = m.info
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"`v` must be [batch, kv_seq, kv_heads, value_dim], got {getattr(v, 'shape', v)!r}")
    h, kvh, dk, dv = info["heads"], info["kv_heads"], info["head_dim"], info["value_dim"]
    if info["reads_qk"] and (not isinstance(q, torch.Tensor) or q.dim() != 4):
        raise ValueError(f"`q` must be [batch, seq, heads, head_dim], got {getattr(q, 'shape', q)!r}")
    b, seq, kv_seq = _lengths(m, q, v)
    if info["reads_qk"]:
        _expect("q", q, (b, seq, h, dk))
        _expect("k", k, (b, kv_seq, kvh, dk))
    _expect("v", v, (b, kv_seq, kvh, dv))
    _expect_extras(info["inputs"], extras, b, kv_seq)
    for name, t in (("q", q), ("k", k)):
        if info["reads_qk"] and t.dtype != v.dtype:
            raise TypeError(f"`{name}` holds {t.dtype} but `v` holds {v.dtype}")
    if q_offset is None:
        return max(kv_seq - seq, 0)
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"`q_offset` must be a non-negative int, got {q_offset!r}")
    return q_offset


def _cu(x, name):
    """Cumulative lengths as an int64 CPU tensor."""
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"`{name}` must be a 1-D integer tensor or list of cumulative lengths, got {x!r}")
    return t.to(device="cpu", dtype=torch.int64).contiguous()


def _validate_packed(m, q, k, v, extras, cu_q, cu_k):
    info = m.info
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"`v` must be [1, total_k, kv_heads, value_dim], got {getattr(v, 'shape', v)!r}")
    if torch.compiler.is_compiling():
        # The boundaries are data here; the native call checks them.
        tq, tk = (q.shape[1] if info["reads_qk"] else v.shape[1]), v.shape[1]
    else:
        tq, tk = int(cu_q[-1]) if len(cu_q) else 0, int(cu_k[-1]) if len(cu_k) else 0
    h, kvh, dk, dv = info["heads"], info["kv_heads"], info["head_dim"], info["value_dim"]
    if info["reads_qk"]:
        _expect("q", q, (1, tq, h, dk))
        _expect("k", k, (1, tk, kvh, dk))
        for name, t in (("q", q), ("k", k)):
            if t.dtype != v.dtype:
                raise TypeError(f"`{name}` holds {t.dtype} but `v` holds {v.dtype}")
    _expect("v", v, (1, tk, kvh, dv))
    for spec_in, t in zip(info["inputs"], extras):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{spec_in['name']}` must be a torch.Tensor, not {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"`{spec_in['name']}` is on {t.device}; the mixc package runs CPU tensors so far")


def _paged_call(m, q, k, v, extras, block_table, seq_lens):
    """`o [batch, seq, heads, value_dim]` against a paged cache (no autograd)."""
    info = m.info
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v) if isinstance(t, torch.Tensor)):
        raise NotImplementedError("a paged KV cache call is for inference: it has no backward "
                                  "(run it under torch.no_grad(), or use a contiguous cache)")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"`{name}` must be a paged cache [num_pages, page_size, kv_heads, dim], "
                             f"got {getattr(t, 'shape', t)!r}")
    pages, page_size = k.shape[0], k.shape[1]
    _expect("k", k, (pages, page_size, info["kv_heads"], info["head_dim"]))
    _expect("v", v, (pages, page_size, info["kv_heads"], info["value_dim"]))
    lens = [int(x) for x in (seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)]
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"`q` must be [batch, seq, heads, head_dim], got {getattr(q, 'shape', q)!r}")
    _expect("q", q, (len(lens), q.shape[1], info["heads"], info["head_dim"]))
    bt = torch.as_tensor(block_table)
    if bt.dim() != 2 or bt.shape[0] != len(lens) or bt.dtype.is_floating_point:
        raise ValueError(f"`block_table` must be an integer [batch={len(lens)}, max_pages] tensor, "
                         f"got {tuple(bt.shape)} {bt.dtype}")
    bt = bt.to(torch.int32).contiguous()
    for spec_in, t in zip(info["inputs"], extras):
        if "seq" in spec_in["dims"]:
            raise NotImplementedError(f"input `{spec_in['name']}` is indexed by position; with a paged KV cache "
                                      "give inputs without a `seq` axis (tables, one entry per row)")
        shape = [len(lens) if d == "batch" else d for d in spec_in["dims"]]
        _expect(spec_in["name"], t, shape, spec_in["dtype"])
    qc, kc, vc, bf16 = m._qkv(q, k, v)
    args, keep = _extra_args(m, extras)
    o = torch.empty((len(lens), q.shape[1], info["heads"], info["value_dim"]), dtype=torch.float32)
    m._m.forward_paged(qc.data_ptr(), q.shape[1], kc.data_ptr(), vc.data_ptr(), pages, page_size, bt.data_ptr(),
                       bt.shape[1], lens, args, o.data_ptr(), bf16=bf16)
    del keep
    return o.to(v.dtype)


_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _storage_dtype(dtype):
    """`Mixer(dtype=)`: None (the tensors' dtype decides), or f32 / bf16 /
    f16 as a name or a torch dtype."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be None, 'f32', 'bf16', 'f16' or the torch dtype, not {dtype!r}")


def _f32(t):
    return t.detach().to(torch.float32).contiguous()


def _extra_args(m, extras):
    """(name, address, is_int) per extra input, and the tensors to keep alive."""
    return _extra_args_of(m.info["inputs"], extras)


def _extra_args_of(inputs, extras):
    """(name, address, is_int) per extra input of a mixer whose inputs are
    `inputs` (its info's), and the converted tensors to keep alive."""
    args, keep = [], []
    for spec_in, t in zip(inputs, extras):
        if spec_in["dtype"] == "i32":
            c = t.detach().to(torch.int32).contiguous()
        else:
            c = _f32(t)
        keep.append(c)
        args.append((spec_in["name"], c.data_ptr(), spec_in["dtype"] == "i32"))
    return args, keep


def _extra_grad_buffers(info, extras):
    """Zeroed f32 gradient buffers for the extra inputs, and (name, address)
    of the differentiable ones' for the native call (`info`: a mixer's)."""
    dex = [torch.zeros(t.shape, dtype=torch.float32) for t in extras]
    diff = set(info["differentiable"])
    return dex, [(i["name"], d.data_ptr()) for i, d in zip(info["inputs"], dex) if i["name"] in diff]


def _as_inputs(dex, extras):
    """The extra inputs' gradients in their inputs' dtypes (f32 for integer ones)."""
    return [d.to(t.dtype) if t.is_floating_point() else d for d, t in zip(dex, extras)]


def _extras_fake(extras):
    """Fake gradients of the extra inputs (`_as_inputs`'s shapes and dtypes)."""
    return [torch.empty(t.shape, dtype=t.dtype if t.is_floating_point() else torch.float32) for t in extras]


def _differentiable_only(info, dex):
    """The extras' gradients autograd gets: None for those without one."""
    diff = set(info["differentiable"])
    return [d if i["name"] in diff else None for i, d in zip(info["inputs"], dex)]


def _mixer_grads_out(m, dq, dk, dv, dex):
    """What a mixer op's autograd formula returns for q, k, v and the extras."""
    if not m.info["reads_qk"]:
        dq = dk = None
    return dq, dk, dv, _differentiable_only(m.info, dex)


def _out_shape(m, q, v):
    b, seq, _ = _lengths(m, q, v)
    return (b, seq, m.info["heads"], m.info["value_dim"])


def _stat_shape(m, q, v):
    b, seq, _ = _lengths(m, q, v)
    return (b, m.info["heads"], seq)


@torch.library.custom_op("mixc::mix", mutates_args=())
def _mix(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         extras: list[torch.Tensor], q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = _MIXERS[handle]
    b, seq, kv_seq = _lengths(m, q, v)
    qc, kc, vc, bf16, elem, o_dtype = _forward_operands(m, q, k, v)
    args, keep = _extra_args(m, extras)
    o = torch.empty(_out_shape(m, q, v), dtype=o_dtype)
    stat = torch.zeros(_stat_shape(m, q, v), dtype=torch.float64)
    # bf16 storage: bf16 tile products where the CPU has them.
    m._m.forward((b, seq, kv_seq, q_offset), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), args,
                 o.data_ptr(), stat.data_ptr(), bf16=bf16, elem=elem)
    del keep
    return o.to(v.dtype), stat


_ELEM = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _forward_operands(m, q, k, v):
    """What a forward hands the native side: q, k, v (bf16 / f16 tensors in
    the storage type as they are, read in place with `o` written in that
    type, no f32 copies; else widened to f32), whether bf16 products may
    run, the element name and `o`'s dtype."""
    stored = _stored_in_place(m, q, k, v)
    if stored is None:
        qc, kc, vc, bf16 = m._qkv(q, k, v)
        return qc, kc, vc, bf16, "f32", torch.float32
    qc, kc, vc = (t.detach().contiguous() for t in (q, k, v))
    return qc, kc, vc, stored == torch.bfloat16, _ELEM[stored], stored


def _stored_in_place(m, q, k, v):
    """The 16-bit storage type when q, k and v (q and k may be empty for a
    convolution) all hold it, so the native forward reads them as they are;
    else None (they are widened to f32)."""
    storage = m.dtype or v.dtype
    if storage not in _ELEM or any(t.numel() and t.dtype != storage for t in (q, k, v)):
        return None
    return storage


@_mix.register_fake
def _mix_fake(handle, q, k, v, extras, q_offset):
    m = _MIXERS[handle]
    return v.new_empty(_out_shape(m, q, v)), v.new_empty(_stat_shape(m, q, v), dtype=torch.float64)


@torch.library.custom_op("mixc::mix_backward", mutates_args=())
def _mix_backward(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  extras: list[torch.Tensor], q_offset: int, o: torch.Tensor, stat: torch.Tensor,
                  d_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    m = _MIXERS[handle]
    b, seq, kv_seq = _lengths(m, q, v)
    (qc, kc, vc, _), oc, doc = m._qkv(q, k, v), _f32(o), _f32(d_o)
    statc = stat.detach().to(torch.float64).contiguous()
    args, keep = _extra_args(m, extras)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (qc, kc, vc))
    dex, dex_args = _extra_grad_buffers(m.info, extras)
    m._m.backward((b, seq, kv_seq, q_offset), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), args, oc.data_ptr(),
                  statc.data_ptr(), doc.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dex_args)
    del keep
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _as_inputs(dex, extras)


@_mix_backward.register_fake
def _mix_backward_fake(handle, q, k, v, extras, q_offset, o, stat, d_o):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _extras_fake(extras)


def _setup_context(ctx, inputs, output):
    handle, q, k, v, extras, q_offset = inputs
    o, stat = output
    ctx.handle = handle
    # A strong reference: the backward finds the handle's object even when
    # the caller's was a temporary.
    ctx.owner = _MIXERS[handle]
    ctx.q_offset = q_offset
    ctx.n_extra = len(extras)
    ctx.save_for_backward(q, k, v, o, stat, *extras)


def _backward(ctx, d_o, _d_stat):
    q, k, v, o, stat, *extras = ctx.saved_tensors
    m = _MIXERS[ctx.handle]
    dq, dk, dv, dex = torch.ops.mixc.mix_backward(ctx.handle, q, k, v, list(extras), ctx.q_offset, o, stat,
                                                  d_o.contiguous())
    dq, dk, dv, dex = _mixer_grads_out(m, dq, dk, dv, dex)
    return None, dq, dk, dv, dex, None


_mix.register_autograd(_backward, setup_context=_setup_context)


def _packed_out_shape(m, q, v, cu_q):
    return (1, q.shape[1] if m.info["reads_qk"] else v.shape[1], m.info["heads"], m.info["value_dim"])


@torch.library.custom_op("mixc::mix_varlen", mutates_args=())
def _mix_varlen(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: list[torch.Tensor],
                cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = _MIXERS[handle]
    qc, kc, vc, bf16 = m._qkv(q, k, v)
    args, keep = _extra_args(m, extras)
    shape = _packed_out_shape(m, q, v, cu_q)
    o = torch.empty(shape, dtype=torch.float32)
    stat = torch.zeros((1, m.info["heads"], shape[1]), dtype=torch.float64)
    m._m.forward_varlen(cu_q.tolist(), cu_k.tolist(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), args,
                        o.data_ptr(), stat.data_ptr(), bf16=bf16)
    del keep
    return o.to(v.dtype), stat


@_mix_varlen.register_fake
def _mix_varlen_fake(handle, q, k, v, extras, cu_q, cu_k):
    m = _MIXERS[handle]
    shape = _packed_out_shape(m, q, v, cu_q)
    return v.new_empty(shape), v.new_empty((1, m.info["heads"], shape[1]), dtype=torch.float64)


@torch.library.custom_op("mixc::mix_varlen_backward", mutates_args=())
def _mix_varlen_backward(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         extras: list[torch.Tensor], cu_q: torch.Tensor, cu_k: torch.Tensor, o: torch.Tensor,
                         stat: torch.Tensor, d_o: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    m = _MIXERS[handle]
    (qc, kc, vc, _), oc, doc = m._qkv(q, k, v), _f32(o), _f32(d_o)
    statc = stat.detach().to(torch.float64).contiguous()
    args, keep = _extra_args(m, extras)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (qc, kc, vc))
    dex, dex_args = _extra_grad_buffers(m.info, extras)
    m._m.backward_varlen(cu_q.tolist(), cu_k.tolist(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), args,
                         oc.data_ptr(), statc.data_ptr(), doc.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                         dex_args)
    del keep
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _as_inputs(dex, extras)


@_mix_varlen_backward.register_fake
def _mix_varlen_backward_fake(handle, q, k, v, extras, cu_q, cu_k, o, stat, d_o):
    return _mix_backward_fake(handle, q, k, v, extras, 0, o, stat, d_o)


def _setup_varlen(ctx, inputs, output):
    handle, q, k, v, extras, cu_q, cu_k = inputs
    o, stat = output
    ctx.handle = handle
    # A strong reference: the backward finds the handle's object even when
    # the caller's was a temporary.
    ctx.owner = _MIXERS[handle]
    ctx.n_extra = len(extras)
    ctx.save_for_backward(q, k, v, o, stat, cu_q, cu_k, *extras)


def _backward_varlen(ctx, d_o, _d_stat):
    q, k, v, o, stat, cu_q, cu_k, *extras = ctx.saved_tensors
    m = _MIXERS[ctx.handle]
    dq, dk, dv, dex = torch.ops.mixc.mix_varlen_backward(ctx.handle, q, k, v, list(extras), cu_q, cu_k, o, stat,
                                                         d_o.contiguous())
    dq, dk, dv, dex = _mixer_grads_out(m, dq, dk, dv, dex)
    return None, dq, dk, dv, dex, None, None


_mix_varlen.register_autograd(_backward_varlen, setup_context=_setup_varlen)


class _Module(torch.nn.Module):
    """A namespace module, so parameter names nest as Hugging Face's do."""


class Block(torch.nn.Module):
    """A transformer block file (`block NAME { ... }` around a `mixer`),
    compiled once, as a module: `out = block(x)` for x `[batch, seq, width]`.

    Parameters are named as one Hugging Face Llama decoder layer's
    (`input_layernorm.weight`, `self_attn.q_proj.weight`, ...,
    `mlp.down_proj.weight`; `[out_features, in_features]`), so
    `block.load_state_dict(...)` takes a layer's weights; they start as the
    seeded weights `mixc run` uses (`seed`). The CPU backend computes the
    block blockwise in f32 (`block_rows` rows at a time; the FFN's hidden
    activations never exist for the whole sequence, and the backward
    recomputes them); gradients reach x and every parameter.
    `device="reference"` runs the f64 unfused block (slow; for tests).
    """

    def __init__(self, spec, *, threads=None, ranks=1, block_rows=None, device="cpu", seed=0, sharding=None):
        super().__init__()
        text, origin = _spec_source(spec)
        self._b = _mixc.Block(text, origin, device, threads, ranks, block_rows, sharding)
        self.info = dict(self._b.info)
        self.name = self.info["name"]
        self.width = self.info["width"]
        self._names = sorted(self.info["weights"])
        for name in self._names:
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, _Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(torch.empty(self.info["weights"][name])))
        with torch.no_grad():
            params = dict(self.named_parameters())
            self._b.init_weights(seed, [(n, params[n].data_ptr()) for n in self._names])
        self._handle = id(self)
        _BLOCKS[self._handle] = self

    def extra_repr(self):
        return f"{self.name}: {self.info['summary']}"

    def _weights(self):
        params = dict(self.named_parameters())
        out = []
        for n in self._names:
            p = params[n]
            _expect(n, p, self.info["weights"][n], "f32")
            out.append(p)
        return out

    def forward(self, x, *, group=None, **extra):
        """`out [batch, seq, width]`; the mixer's extra inputs (segment ids,
        tables, gates) are keyword arguments by their spec names, in the
        shapes the mixer declares (float ones get gradients).

        With `group=` (a `torch.distributed` process group), x is this
        process's shard of the sequence (`mixc.shard(x, rank, world,
        sharding=block.info["sharding"])`) and the result its rows of the
        output: the projections, norms and FFN run on the shard, and the
        mixer's keys and values travel around the ring (Ring Attention);
        the extra inputs are whole on every rank, and the weights' and
        extras' gradients are summed over the group."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.width:
            raise ValueError(f"`x` must be [batch, seq, {self.width}] (block `{self.name}`), "
                             f"got {getattr(x, 'shape', x)!r}")
        _expect("x", x, tuple(x.shape), "f32")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"`x` must have at least one batch row and one position, got {list(x.shape)}")
        inputs = self.info["mixer"]["inputs"]
        names = [i["name"] for i in inputs]
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise TypeError(f"block `{self.name}` has no input {', '.join(unknown)} (it takes {names or 'none'})")
        missing = [n for n in names if n not in extra]
        if missing:
            raise TypeError(f"block `{self.name}` needs input {', '.join(missing)}")
        b, seq = x.shape[0], x.shape[1]
        extras = [extra[n] for n in names]
        if group is None:
            # (With a group, the whole sequence's length is known only
            # inside the ring op, which checks the extras then.)
            _expect_extras(inputs, extras, b, seq)
        weights = self._weights()
        train = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)
                                             or any(t.requires_grad for t in extras))
        if group is not None:
            from ._ring import block_ring_call
            return block_ring_call(self, x, extras, weights, train, group)
        out, _ = torch.ops.mixc.block(self._handle, x, extras, weights, train)
        return out


_BLOCKS = weakref.WeakValueDictionary()


def _saved_shapes(block, b, n):
    """Shapes and dtypes of what a training forward on `n` rows (all, or a
    rank's) keeps: q, k, v, o and the statistic of those rows (see
    `BlockResiduals::parts`)."""
    m = block.info["mixer"]
    h, kvh, dk, dv = m["heads"], m["kv_heads"], m["head_dim"], m["value_dim"]
    f32, f64 = torch.float32, torch.float64
    return [((b, n, h, dk), f32), ((b, n, kvh, dk), f32), ((b, n, kvh, dv), f32),
            ((b, n, h, dv), f32), ((b, h, n), f64)]


@torch.library.custom_op("mixc::block", mutates_args=())
def _block(handle: int, x: torch.Tensor, extras: list[torch.Tensor], weights: list[torch.Tensor],
           train: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    block = _BLOCKS[handle]
    xc = _f32(x)
    ws = [_f32(w) for w in weights]
    args, keep = _extra_args_of(block.info["mixer"]["inputs"], extras)
    out = torch.empty_like(xc)
    b, seq = xc.shape[0], xc.shape[1]
    saved = [torch.zeros(shape, dtype=dt) for shape, dt in _saved_shapes(block, b, seq)] if train else []
    named = [(n, w.data_ptr()) for n, w in zip(block._names, ws)]
    block._b.forward((b, seq), xc.data_ptr(), args, named, out.data_ptr(),
                     tuple(t.data_ptr() for t in saved) if train else None)
    del keep
    return out.to(x.dtype), saved


@_block.register_fake
def _block_fake(handle, x, extras, weights, train):
    block = _BLOCKS[handle]
    saved = ([x.new_empty(shape, dtype=dt) for shape, dt in _saved_shapes(block, x.shape[0], x.shape[1])]
             if train else [])
    return torch.empty_like(x), saved


@torch.library.custom_op("mixc::block_backward", mutates_args=())
def _block_backward(handle: int, x: torch.Tensor, extras: list[torch.Tensor], weights: list[torch.Tensor],
                    saved: list[torch.Tensor], d_out: torch.Tensor
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    block = _BLOCKS[handle]
    c = _BlockBackwardCall(block, x, extras, weights, saved, d_out)
    block._b.backward((c.xc.shape[0], c.xc.shape[1]), *c.args())
    return c.results(x, extras, weights)


class _BlockBackwardCall:
    """The buffers of a block backward call (the plain one and a rank's):
    f32 inputs, gradient buffers, and their addresses in the native
    call's order after the lengths (and the rank's transport)."""

    def __init__(self, block, x, extras, weights, saved, d_out):
        minfo = block.info["mixer"]
        self.xc, self.g = _f32(x), _f32(d_out)
        self.ws = [_f32(w) for w in weights]
        self.extra_args, self.keep = _extra_args_of(minfo["inputs"], extras)
        self.sv = [t.detach().contiguous() for t in saved]
        self.dx = torch.empty_like(self.xc)
        self.dws = [torch.zeros_like(w) for w in self.ws]
        self.dex, self.dex_named = _extra_grad_buffers(minfo, extras)
        self.names = block._names

    def args(self):
        return (self.xc.data_ptr(), self.extra_args, [(n, w.data_ptr()) for n, w in zip(self.names, self.ws)],
                tuple(t.data_ptr() for t in self.sv), self.g.data_ptr(), self.dx.data_ptr(),
                [(n, d.data_ptr()) for n, d in zip(self.names, self.dws)], self.dex_named)

    def results(self, x, extras, weights):
        return (self.dx.to(x.dtype), [d.to(w.dtype) for d, w in zip(self.dws, weights)],
                _as_inputs(self.dex, extras))


@_block_backward.register_fake
def _block_backward_fake(handle, x, extras, weights, saved, d_out):
    return torch.empty_like(x), [torch.empty_like(w) for w in weights], _extras_fake(extras)


def _block_saved(ctx):
    """x, extras, weights and the residuals a block op's context kept."""
    if not ctx.train:
        raise RuntimeError("mixc: this block ran without keeping what its backward needs "
                           "(no input or parameter required grad when it was called)")
    x, *rest = ctx.saved_tensors
    e, w = ctx.n_extra, ctx.n_weights
    return x, list(rest[:e]), list(rest[e:e + w]), list(rest[e + w:])


def _setup_block(ctx, inputs, output):
    handle, x, extras, weights, train = inputs
    _, saved = output
    ctx.train = train
    ctx.handle = handle
    # A strong reference: the backward finds the handle's object even when
    # the caller's was a temporary.
    ctx.owner = _BLOCKS[handle]
    ctx.n_extra, ctx.n_weights = len(extras), len(weights)
    ctx.save_for_backward(x, *extras, *weights, *saved)


def _backward_block(ctx, d_out, _d_saved):
    x, extras, weights, saved = _block_saved(ctx)
    dx, dws, dex = torch.ops.mixc.block_backward(ctx.handle, x, extras, weights, saved, d_out.contiguous())
    dex = _differentiable_only(_BLOCKS[ctx.handle].info["mixer"], dex)
    return None, dx, dex, dws, None


_block.register_autograd(_backward_block, setup_context=_setup_block)
