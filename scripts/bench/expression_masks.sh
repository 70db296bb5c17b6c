#!/usr/bin/env bash
# Block skipping under expression masks on the CPU backend (issue 18): a
# block-mask input keeping 10 / 25 / 50 / 100% of its 64 x 64 blocks (the
# tables are random normal(0, 0.5), so the threshold t keeps P(N > 2t) of
# them), a per-head window written as a condition, the built-in window of
# the same mean width, and dense attention; 8 heads, d = 64, f32, L = 8192.
# Usage: scripts/bench/expression_masks.sh [extra `mixc bench` flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p mixc-cli
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for kt in 10:0.6408 25:0.3372 50:0.0 100:-100.0; do
    cat > "$dir/block_mask_${kt%%:*}.mix" <<SPEC
mixer block_mask_${kt%%:*} { heads = 8; head_dim = 64; dtype = f32;
  input bm: f32[batch, heads, 128, 128];
  mask = bm[b][h][div(i, 64)][div(j, 64)] > ${kt##*:}; }
SPEC
done
echo 'mixer dense { heads = 8; head_dim = 64; dtype = f32; mask = all; }' > "$dir/dense.mix"
echo 'mixer per_head_window { heads = 8; head_dim = 64; dtype = f32; mask = j <= i && i - j < 512 * (h + 1); }' > "$dir/per_head_window.mix"
echo 'mixer window_2304 { heads = 8; head_dim = 64; dtype = f32; mask = causal && window(2304); }' > "$dir/window_2304.mix"
./target/release/mixc bench --backend cpu --seq 8k "${@:---reps=3}" \
    "$dir/dense.mix" "$dir"/block_mask_*.mix "$dir/per_head_window.mix" "$dir/window_2304.mix"
