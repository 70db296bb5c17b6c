"""Rings over torch.distributed: 2 and 4 CPU processes (gloo), spawned by
the test, give each rank the rows of the single-process output and
gradients (every family: softmax with GQA, a bias table and document ids,
linear, gated with a gate gradient, convolution; zigzag and contiguous
sharding); the checks run inside the processes (ring_worker.py)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("world", [2, 4])
def test_ring_over_gloo_equals_one_process(world, tmp_path):
    init = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ring_worker.py"), str(r), str(world), str(init)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out))
    for r, (code, out) in enumerate(outs):
        assert code == 0, f"rank {r} failed:\n{out[-4000:]}"
        assert f"rank {r}/{world}: ok" in out


def test_shard_and_unshard_are_inverse():
    import torch

    import mixc

    x = torch.randn(2, 23, 3)
    for world in (1, 2, 3, 5):
        for sharding in ("zigzag", "contiguous"):
            parts = [mixc.shard(x, r, world, sharding=sharding) for r in range(world)]
            assert sum(p.shape[1] for p in parts) == 23
            assert torch.equal(mixc.unshard(parts, sharding=sharding), x)
    # zigzag: rank 0 of 2 holds the first and the last quarter.
    assert mixc.ring_shards(8, 2, "zigzag")[0] == [(0, 2), (6, 8)]
    with pytest.raises(ValueError, match="sharding"):
        mixc.ring_shards(8, 2, "diagonal")
    with pytest.raises(ValueError, match="ranks"):
        mixc.ring_shards(3, 4, "zigzag")


def test_group_needs_torch_distributed():
    import torch

    import mixc

    m = mixc.Mixer("mixer c { heads = 2; head_dim = 8; mask = causal; }")
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        m(x, x, x, group=object())
