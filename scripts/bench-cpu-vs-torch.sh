#!/usr/bin/env bash
# mixc's CPU backend vs PyTorch's CPU scaled_dot_product_attention (causal,
# f32 and bf16, batch 1, 8 heads, d = 128, L in {1k, 4k, 16k}): time and peak
# memory of each in its own process, in interleaved rounds (the time of a
# point is the median over rounds), one table with mixc/PyTorch ratios,
# mixc's useful GFLOP/s and its fraction of the limit (`mixc bench --peak`:
# mixc's own tile products on in-cache tiles; PyTorch's large GEMM is
# reported beside it), and the full results as JSON (results/cpu-vs-torch.json).
#
#   scripts/bench-cpu-vs-torch.sh [--smoke] [--no-torch] [--seq 1k,4k,16k] [--reps N]
#                                 [--dtype f32,bf16] [--rounds N] [--pass fwd|bwd|fwdbwd]
#
# --pass bwd times the backward alone (mixc: `mixc bench --pass bwd`;
# PyTorch: `out.backward(do)` through autograd), the forward of each
# repetition untimed; the peak RSS then includes the forward's residuals and
# the gradients. Results go to results/cpu-vs-torch[-PASS].json.
# PyTorch goes into a local venv, .venv-bench/ (git-ignored), created on the
# first run: the CPU-only wheel from PyTorch's own index when that index can
# be reached, else the default wheel from PyPI (it runs on the CPU as well,
# but downloads the CUDA libraries too: several GB).
# --smoke: tiny sizes, one rep (seconds); --no-torch: time mixc only and say
# so (for CI, which must not download torch). MIXC_BIN: use this mixc binary
# instead of building target/release/mixc.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0 TORCH=1 SEQ="1k,4k,16k" REPS=3 HEADS=8 HEAD_DIM=128 PASS=fwd DTYPE=f32,bf16 ROUNDS=3 MATMUL=4096
OUT_DIR="${OUT_DIR:-results}"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --no-torch) TORCH=0 ;;
        --seq) SEQ="$2"; shift ;;
        --reps) REPS="$2"; shift ;;
        --pass) PASS="$2"; shift ;;
        --dtype) DTYPE="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --out-dir) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "bench-cpu-vs-torch: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$SMOKE" = 1 ]; then
    SEQ="128,256" REPS=1 HEADS=2 ROUNDS=1 MATMUL=256
fi

if [ -n "${MIXC_BIN:-}" ]; then
    MIXC="$MIXC_BIN"
else
    echo "bench-cpu-vs-torch: cargo build --release -p mixc-cli" >&2
    cargo build --release -p mixc-cli --quiet
    MIXC=target/release/mixc
fi
[ -x "$MIXC" ] || { echo "bench-cpu-vs-torch: $MIXC is not an executable" >&2; exit 1; }

TORCH_ARGS=()
if [ "$TORCH" = 1 ]; then
    VENV=.venv-bench
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "bench-cpu-vs-torch: installing PyTorch into $VENV" >&2
        python3 -m venv "$VENV"
        # The CPU wheel is ~200 MB; PyPI's default wheel also pulls the CUDA libraries.
        "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            --index-url https://download.pytorch.org/whl/cpu torch numpy 2>/dev/null ||
            { echo "bench-cpu-vs-torch: PyTorch's CPU index unreachable; installing torch from PyPI" >&2
              "$VENV/bin/pip" install --quiet --disable-pip-version-check torch numpy; }
    fi
    TORCH_ARGS=(--torch-python "$VENV/bin/python")
else
    echo "NOT EXERCISED: PyTorch (--no-torch): the table has mixc's columns only" >&2
    # The torch worker must still parse its arguments (it imports torch late).
    PYTHONPYCACHEPREFIX="$(mktemp -d)" python3 -m py_compile scripts/bench/torch_cpu_sdpa.py
    python3 scripts/bench/torch_cpu_sdpa.py --help >/dev/null
fi

mkdir -p "$OUT_DIR"
SUFFIX=""
[ "$PASS" != fwd ] && SUFFIX="-$PASS"
[ "$SMOKE" = 1 ] && SUFFIX="$SUFFIX-smoke"
python3 scripts/bench/compare_cpu.py --mixc "$MIXC" "${TORCH_ARGS[@]}" \
    --seq "$SEQ" --reps "$REPS" --heads "$HEADS" --head-dim "$HEAD_DIM" --pass "$PASS" \
    --dtype "$DTYPE" --rounds "$ROUNDS" --matmul "$MATMUL" \
    --out "$OUT_DIR/cpu-vs-torch$SUFFIX.json" --markdown "$OUT_DIR/cpu-vs-torch$SUFFIX.md"
echo "wrote $OUT_DIR/cpu-vs-torch$SUFFIX.json and .md" >&2
