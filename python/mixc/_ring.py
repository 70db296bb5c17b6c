"""Rings over `torch.distributed`: each process holds its shard of the
sequence and runs its rank of the library's ring (the same schedule the
CPU backend runs as threads), the ring's messages (key/value shards,
states, gradients on their way home) carried by the process group."""

import torch
import torch.distributed as dist

from . import _mixc


def ring_shards(seq, world, sharding="zigzag"):
    """Per rank, the `(start, end)` position ranges it owns, in order:
    `seq` positions dealt over `world` ranks by `sharding` (`"zigzag"`:
    chunks r and 2R-1-r, balanced under a causal mask; `"contiguous"`)."""
    return _mixc.ring_shards(seq, world, sharding)


def shard(x, rank, world, *, sharding="zigzag", dim=1):
    """Rank `rank`'s shard of a whole-sequence tensor (sequence axis `dim`):
    its positions' slices, concatenated in order."""
    ranges = ring_shards(x.shape[dim], world, sharding)[rank]
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim)


def unshard(parts, *, sharding="zigzag", dim=1):
    """The whole-sequence tensor from every rank's shard (`parts[r]` is
    rank r's, as `shard` gives it); differentiable."""
    world = len(parts)
    seq = sum(p.shape[dim] for p in parts)
    pieces = []
    for part, ranges in zip(parts, ring_shards(seq, world, sharding)):
        off = 0
        for a, b in ranges:
            pieces.append((a, part.narrow(dim, off, b - a)))
            off += b - a
    pieces.sort(key=lambda p: p[0])
    return torch.cat([p for _, p in pieces], dim)


class _GroupTransport:
    """The ring's byte messages over a process group: a header (length,
    sender) then the payload, each an `isend` that is waited for only when
    the call ends (every rank sends before it receives); receives take the
    next header from any rank, then that rank's payload."""

    _HEADER, _PAYLOAD = 1, 2

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.pending = []

    def _global(self, r):
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def send(self, to, data):
        dst = self._global(to)
        header = torch.tensor([len(data), self.rank], dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for t, tag in ((header, self._HEADER), (payload, self._PAYLOAD)):
            self.pending.append((dist.isend(t, dst, group=self.group, tag=tag), t))

    def recv(self):
        header = torch.empty(2, dtype=torch.int64)
        dist.recv(header, src=None, group=self.group, tag=self._HEADER)
        n, src = header.tolist()
        payload = torch.empty(n, dtype=torch.uint8)
        dist.recv(payload, src=self._global(src), group=self.group, tag=self._PAYLOAD)
        return payload.numpy().tobytes()

    def finish(self):
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def _seq_of(n, group):
    """The whole sequence's length: the sum of the ranks' shard lengths."""
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _group(name):
    """The process group a ring op names (by `group_name`, which
    torch.compile keeps as a constant in the graph)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _ring_seq(inputs, sharding, group, b, n, extras):
    """The whole sequence's length (one all-reduce), after checking that
    this rank's `n` positions are its shard under `sharding` and the extras
    (declared by `inputs`, a mixer info's) are whole."""
    from . import _expect_extras

    seq = _seq_of(n, group)
    check_shard(n, seq, group, sharding)
    _expect_extras(inputs, extras, b, seq)
    return seq


@torch.library.custom_op("mixc::mix_ring", mutates_args=())
def _mix_ring(handle: int, group: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              extras: list[torch.Tensor], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from . import _MIXERS, _extra_args, _forward_operands

    m, pg = _MIXERS[handle], _group(group)
    b, n = v.shape[0], v.shape[1]
    seq = _ring_seq(m.info["inputs"], m.info["sharding"], pg, b, n, extras)
    transport = _GroupTransport(pg)
    info = m.info
    qc, kc, vc, bf16, elem, o_dtype = _forward_operands(m, q, k, v)
    args, keep = _extra_args(m, extras)
    o = torch.empty((b, n, info["heads"], info["value_dim"]), dtype=o_dtype)
    stat = torch.zeros((b, info["heads"], n) if train else (0,), dtype=torch.float64)
    try:
        m._m.forward_rank((b, seq), transport.rank, transport.world, transport, qc.data_ptr(),
                          kc.data_ptr(), vc.data_ptr(), args, o.data_ptr(),
                          stat.data_ptr() if train else None, bf16=bf16, elem=elem)
    finally:
        transport.finish()
    del keep
    return o.to(v.dtype), stat


@_mix_ring.register_fake
def _mix_ring_fake(handle, group, q, k, v, extras, train):
    from . import _MIXERS

    info = _MIXERS[handle].info
    b, n = v.shape[0], v.shape[1]
    return (v.new_empty((b, n, info["heads"], info["value_dim"])),
            v.new_empty((b, info["heads"], n) if train else (0,), dtype=torch.float64))


@torch.library.custom_op("mixc::mix_ring_backward", mutates_args=())
def _mix_ring_backward(handle: int, group: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       extras: list[torch.Tensor], o: torch.Tensor, stat: torch.Tensor, d_o: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    from . import _MIXERS, _as_inputs, _extra_args, _extra_grad_buffers, _f32

    m, pg = _MIXERS[handle], _group(group)
    b, n = v.shape[0], v.shape[1]
    seq = _seq_of(n, pg)
    transport = _GroupTransport(pg)
    (qc, kc, vc, _), oc, doc = m._qkv(q, k, v), _f32(o), _f32(d_o)
    statc = stat.detach().to(torch.float64).contiguous()
    args, keep = _extra_args(m, extras)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (qc, kc, vc))
    dex, dex_args = _extra_grad_buffers(m.info, extras)
    diff = set(m.info["differentiable"])
    try:
        m._m.backward_rank((b, seq), transport.rank, transport.world, transport, qc.data_ptr(),
                           kc.data_ptr(), vc.data_ptr(), args, oc.data_ptr(), statc.data_ptr(),
                           doc.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dex_args)
    finally:
        transport.finish()
    del keep
    # Each rank holds its part of the whole inputs' gradients: summed here.
    for i, d in zip(m.info["inputs"], dex):
        if i["name"] in diff:
            dist.all_reduce(d, group=pg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _as_inputs(dex, extras)


@_mix_ring_backward.register_fake
def _mix_ring_backward_fake(handle, group, q, k, v, extras, o, stat, d_o):
    from . import _mix_backward_fake

    return _mix_backward_fake(handle, q, k, v, extras, 0, o, stat, d_o)


def _setup_ring(ctx, inputs, output):
    from . import _MIXERS

    handle, group, q, k, v, extras, train = inputs
    o, stat = output
    ctx.handle, ctx.group, ctx.train = handle, group, train
    ctx.owner = _MIXERS[handle]  # the backward finds it even for a temporary mixer
    ctx.save_for_backward(q, k, v, o, stat, *extras)


def _backward_ring(ctx, d_o, _d_stat):
    from . import _MIXERS, _mixer_grads_out

    if not ctx.train:
        raise RuntimeError("mixc: this ring call ran without keeping what its backward needs "
                           "(no input required grad when it was called)")
    q, k, v, o, stat, *extras = ctx.saved_tensors
    dq, dk, dv, dex = torch.ops.mixc.mix_ring_backward(ctx.handle, ctx.group, q, k, v, list(extras), o, stat,
                                                       d_o.contiguous())
    dq, dk, dv, dex = _mixer_grads_out(_MIXERS[ctx.handle], dq, dk, dv, dex)
    return None, None, dq, dk, dv, dex, None


_mix_ring.register_autograd(_backward_ring, setup_context=_setup_ring)


def check_shard(n, seq, group, sharding):
    """That this rank's `n` positions are its shard of `seq` under `sharding`."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group= needs torch.distributed initialised (init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    want = ring_shards(seq, world, sharding) if world <= seq else None
    if want is None or sum(e - s for s, e in want[rank]) != n:
        raise ValueError(
            f"rank {rank} holds {n} positions of a {seq}-position sequence over {world} ranks, "
            f"which is not its {sharding} shard: shard with mixc.shard(x, rank, world, "
            f"sharding={sharding!r})")


@torch.library.custom_op("mixc::block_ring", mutates_args=())
def _block_ring(handle: int, group: str, x: torch.Tensor, extras: list[torch.Tensor],
                weights: list[torch.Tensor], train: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """This rank's rows of a block's output, the block's ring over the
    group named `group`; with `train`, what its backward needs (this rank's
    rows of q, k, v, o and of the statistic)."""
    from . import _BLOCKS, _extra_args_of, _f32, _saved_shapes

    block, pg = _BLOCKS[handle], _group(group)
    b, n = x.shape[0], x.shape[1]
    seq = _ring_seq(block.info["mixer"]["inputs"], block.info["sharding"], pg, b, n, extras)
    transport = _GroupTransport(pg)
    xc = _f32(x)
    ws = [_f32(w) for w in weights]
    args, keep = _extra_args_of(block.info["mixer"]["inputs"], extras)
    out = torch.empty_like(xc)
    saved = [torch.zeros(s, dtype=dt) for s, dt in _saved_shapes(block, b, n)] if train else []
    named = [(name, w.data_ptr()) for name, w in zip(block._names, ws)]
    try:
        block._b.forward_rank((b, seq), transport.rank, transport.world, transport, xc.data_ptr(), args,
                              named, out.data_ptr(), tuple(t.data_ptr() for t in saved) if train else None)
    finally:
        transport.finish()
    del keep
    return out.to(x.dtype), saved


@_block_ring.register_fake
def _block_ring_fake(handle, group, x, extras, weights, train):
    from . import _BLOCKS, _saved_shapes

    shapes = _saved_shapes(_BLOCKS[handle], x.shape[0], x.shape[1]) if train else []
    return torch.empty_like(x), [x.new_empty(s, dtype=dt) for s, dt in shapes]


@torch.library.custom_op("mixc::block_ring_backward", mutates_args=())
def _block_ring_backward(handle: int, group: str, x: torch.Tensor, extras: list[torch.Tensor],
                         weights: list[torch.Tensor], saved: list[torch.Tensor], d_out: torch.Tensor
                         ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    from . import _BLOCKS, _BlockBackwardCall

    block, pg = _BLOCKS[handle], _group(group)
    seq = _seq_of(x.shape[1], pg)
    transport = _GroupTransport(pg)
    c = _BlockBackwardCall(block, x, extras, weights, saved, d_out)
    try:
        block._b.backward_rank((c.xc.shape[0], seq), transport.rank, transport.world, transport, *c.args())
    finally:
        transport.finish()
    # Each rank holds its part of the weights' (and whole extras') gradients.
    diff = set(block.info["mixer"]["differentiable"])
    for d in c.dws:
        dist.all_reduce(d, group=pg)
    for i, d in zip(block.info["mixer"]["inputs"], c.dex):
        if i["name"] in diff:
            dist.all_reduce(d, group=pg)
    return c.results(x, extras, weights)


@_block_ring_backward.register_fake
def _block_ring_backward_fake(handle, group, x, extras, weights, saved, d_out):
    from . import _block_backward_fake

    return _block_backward_fake(handle, x, extras, weights, saved, d_out)


def _setup_block_ring(ctx, inputs, output):
    from . import _BLOCKS

    handle, group, x, extras, weights, train = inputs
    _, saved = output
    ctx.handle, ctx.group, ctx.train = handle, group, train
    ctx.owner = _BLOCKS[handle]  # the backward finds it even for a temporary block
    ctx.n_extra, ctx.n_weights = len(extras), len(weights)
    ctx.save_for_backward(x, *extras, *weights, *saved)


def _backward_block_ring(ctx, d_out, _d_saved):
    from . import _BLOCKS, _block_saved, _differentiable_only

    x, extras, weights, saved = _block_saved(ctx)
    dx, dws, dex = torch.ops.mixc.block_ring_backward(ctx.handle, ctx.group, x, extras, weights, saved,
                                                      d_out.contiguous())
    dex = _differentiable_only(_BLOCKS[ctx.handle].info["mixer"], dex)
    return None, None, dx, dex, dws, None


_block_ring.register_autograd(_backward_block_ring, setup_context=_setup_block_ring)


def block_ring_call(block, x, extras, weights, train, group):
    """This rank's rows of `block`'s output over `group` (x this rank's shard)."""
    if not torch.compiler.is_compiling() and (not dist.is_available() or not dist.is_initialized()):
        raise RuntimeError("group= needs torch.distributed initialised (init_process_group)")
    out, _ = torch.ops.mixc.block_ring(block._handle, group.group_name, x, list(extras), list(weights), train)
    return out


def ring_call(m, q, k, v, extras, group):
    """`o` (this rank's rows) of a ring over `group`: q, k, v are this
    rank's shards (`[batch, n, heads, dim]`, `shard`'s order under the
    mixer's sharding), extras whole. The call is the op `mixc::mix_ring`
    (the group passed by name), so it compiles under torch.compile."""
    from . import _expect

    if not torch.compiler.is_compiling() and (not dist.is_available() or not dist.is_initialized()):
        raise RuntimeError("group= needs torch.distributed initialised (init_process_group)")
    info = m.info
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"`v` must be [batch, n, kv_heads, value_dim], got {getattr(v, 'shape', v)!r}")
    b, n = v.shape[0], v.shape[1]
    if info["reads_qk"]:
        _expect("q", q, (b, n, info["heads"], info["head_dim"]))
        _expect("k", k, (b, n, info["kv_heads"], info["head_dim"]))
    else:
        q = v.new_empty(0) if q is None else q
        k = v.new_empty(0) if k is None else k
    _expect("v", v, (b, n, info["kv_heads"], info["value_dim"]))
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *extras))
    name = group.group_name if group is not None else dist.group.WORLD.group_name
    o, _stat = torch.ops.mixc.mix_ring(m._handle, name, q, k, v, list(extras), train)
    return o
