#!/usr/bin/env bash
# The GPU check (issues 5, 6, 7), for a GPU machine with no Rust toolchain and
# no network. It runs the binaries that scripts/build-for-device.sh put in
# dist/ (carry dist/ along with the repository):
#   (1) the GPU test executables (dist/tests/*), failing if any skips for want
#       of a GPU, and `mixc run --backend cuda --check` on every example spec
#       with R = 1 and R = 4 virtual ranks (fails on any error);
#   (grad) `mixc run --grad --check` on every example whose backward runs on
#       the backend (the rest listed as not exercised, with the reason);
#   (2)-(6) scripts/bench/peers.py: SDPA (FlashAttention, cuDNN), FlexAttention,
#       the backward vs SDPA's and Flex's (bwd), a chunkwise PyTorch reference,
#       ring overhead, longest L, `mixc tune`.
# Prints one table of mixc/peer ratios and writes, under $OUT (else
# results/gpu-check-<time>/): gpu-check.md, gpu-check.log, tests.log,
# peers.json, peers.md (at most 8 files, one folder deep).
#
#   scripts/gpu-check.sh [--smoke] [--sections check,grad,sdpa,flex,bwd,linear,ring,longest,tune] [--quick]
#                        [-- extra peers.py arguments]
#
# --sections: a subset, e.g. to split the check over several calls of at most
#   10 minutes each (check = step 1; the rest are peers.py's sections).
# --quick: L in {1k, 4k, 16k, 64k} and fewer repetitions.
# --smoke: runs on a machine without a GPU in well under a minute: the same
#   paths with tiny sizes and --backend cpu; GPU test binaries are not run,
#   PyTorch is not imported; python scripts are compiled and their --help
#   and --dry-run exercised. Everything not exercised is listed as such.
# MIXC_BIN overrides the mixc binary (default dist/mixc, else target/release/mixc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

SMOKE=0 QUICK=0 SECTIONS="check,grad,sdpa,flex,bwd,linear,ring,longest,tune"
PEER_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --quick) QUICK=1 ;;
        --sections) SECTIONS="$2"; shift ;;
        --) shift; PEER_ARGS+=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${OUT:-}" ]; then
    RESULTS="$OUT"
elif [ "$SMOKE" = 1 ]; then
    RESULTS="$(mktemp -d -t gpu-check-smoke.XXXXXX)"
else
    RESULTS="results/gpu-check-$(date -u +%Y%m%d-%H%M%S)"
fi
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
LOG="$RESULTS/gpu-check.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG" >&2; }
NOT_EXERCISED=()
not_exercised() { NOT_EXERCISED+=("$*"); say "NOT EXERCISED: $*"; }
FAILED=()
fail() { FAILED+=("$*"); say "FAIL: $*"; }
has_section() { [[ ",$SECTIONS," == *",$1,"* ]]; }

# ---------- binaries ----------
if [ -n "${MIXC_BIN:-}" ]; then
    MIXC="$MIXC_BIN"
elif [ -x dist/mixc ]; then
    MIXC="$ROOT/dist/mixc"
else
    MIXC="$ROOT/target/release/mixc"
fi
[ -x "$MIXC" ] || { say "gpu-check: no mixc binary at $MIXC: run scripts/build-for-device.sh (or set MIXC_BIN)"; exit 1; }
say "gpu-check: mixc = $MIXC ($("$MIXC" --version)), results in $RESULTS"
USES_DIST=0
[ "$MIXC" = "$ROOT/dist/mixc" ] && [ -f dist/MANIFEST.json ] && USES_DIST=1
if [ "$USES_DIST" = 1 ]; then
    say "gpu-check: dist/ built $(python3 -c 'import json;m=json.load(open("dist/MANIFEST.json"));print(m["built"], "from", m["commit"][:12], "(dirty)" if m["dirty"] else "")')"
fi

# ---------- environment: GPU, NVRTC ----------
if [ "$SMOKE" = 1 ]; then
    BACKEND=cpu
    not_exercised "nvidia-smi and the GPU (smoke mode runs --backend cpu)"
else
    BACKEND=cuda
    nvidia-smi 2>&1 | tee -a "$LOG" >&2 || { say "gpu-check: nvidia-smi failed: no usable GPU"; exit 1; }
fi
# NVRTC and the CUDA headers: MIXC_CUDA_DIR if set, else a toolkit under
# /usr/local/cuda, else the pip `nvidia` packages of python3 (PyTorch's).
if [ -z "${MIXC_CUDA_DIR:-}" ]; then
    for d in /usr/local/cuda "$ROOT/.cuda/nvidia/cu13" \
        $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13") for p in nvidia.__path__))' 2>/dev/null); do
        if compgen -G "$d/lib*/libnvrtc.so*" >/dev/null || compgen -G "$d/targets/x86_64-linux/lib/libnvrtc.so*" >/dev/null; then
            if [ -f "$d/include/cuda_fp16.h" ]; then
                export MIXC_CUDA_DIR="$d"
                break
            fi
        fi
    done
fi
if [ -n "${MIXC_CUDA_DIR:-}" ]; then
    for l in lib64 lib targets/x86_64-linux/lib; do
        # NVRTC dlopens libnvrtc-builtins by name: the loader must see its folder.
        [ -d "$MIXC_CUDA_DIR/$l" ] && export LD_LIBRARY_PATH="$MIXC_CUDA_DIR/$l${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    say "gpu-check: NVRTC from MIXC_CUDA_DIR=$MIXC_CUDA_DIR"
elif [ "$SMOKE" = 1 ]; then
    not_exercised "NVRTC lookup (no CUDA toolkit here; scripts/install-cuda.sh provides one)"
else
    say "gpu-check: NVRTC not found (looked in /usr/local/cuda and python's nvidia packages); set MIXC_CUDA_DIR"
    exit 1
fi
export MIXC_EXAMPLES_DIR="$ROOT/examples"
# Kernel and tuning caches stay out of the results folder (which comes back).
export MIXC_CACHE_DIR="${MIXC_CACHE_DIR:-$(mktemp -d -t mixc-cache.XXXXXX)}"
# No __pycache__ folders in the checkout.
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$(mktemp -d -t pycache.XXXXXX)}"

# ---------- (1) tests and --check on every example ----------
if has_section check; then
    TESTS_LOG="$RESULTS/tests.log"
    : >"$TESTS_LOG"
    if [ "$SMOKE" = 1 ]; then
        if [ -d dist/tests ]; then
            not_exercised "GPU test binaries: $(ls dist/tests | tr '\n' ' ')(smoke: no GPU)"
        else
            not_exercised "GPU test binaries (no dist/tests; scripts/build-for-device.sh builds them)"
        fi
    elif ! compgen -G "dist/tests/*" >/dev/null; then
        fail "no GPU test binaries in dist/tests: run scripts/build-for-device.sh and carry dist/"
    else
        # Tests find examples/ through CARGO_MANIFEST_DIR, compiled in: point the
        # build machine's path at this checkout when it does not exist here.
        BUILD_ROOT="$(python3 -c 'import json;print(json.load(open("dist/MANIFEST.json"))["build_root"])' 2>/dev/null || true)"
        if [ -n "$BUILD_ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
            mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT" &&
                say "gpu-check: linked $BUILD_ROOT -> $ROOT for the test binaries"
        fi
        ONE="$(mktemp)"
        for t in dist/tests/*; do
            name="$(basename "$t")"
            say "gpu-check: test binary $name"
            set +e
            # --nocapture: the tests' SKIPPED lines and timings go to the log.
            "$t" --test-threads=1 --nocapture >"$ONE" 2>&1
            rc=$?
            set -e
            { echo "===== $name (exit $rc)"; cat "$ONE"; } >>"$TESTS_LOG"
            # A GPU test that skips here means the GPU was not usable: a failure.
            if [ $rc -ne 0 ]; then
                fail "test binary $name exited $rc (see tests.log)"
            elif grep -q "SKIPPED: no GPU" "$ONE"; then
                fail "test binary $name skipped GPU tests on a GPU machine (see tests.log)"
            fi
            grep -E "^test result:" "$ONE" | tail -1 | sed "s/^/  $name: /" | tee -a "$LOG" >&2 || true
        done
        rm -f "$ONE"
    fi
    if [ "$SMOKE" = 1 ]; then CHECK_SEQ=200; else CHECK_SEQ=4099; fi
    n_ok=0
    for spec in examples/*.mix; do
        for r in 1 4; do
            set +e
            out="$("$MIXC" run "$spec" --backend "$BACKEND" --seq "$CHECK_SEQ" --batch 2 --ranks "$r" --check --json 2>&1)"
            rc=$?
            set -e
            echo "$spec R=$r: $out" >>"$TESTS_LOG"
            if [ $rc -ne 0 ]; then
                fail "mixc run $spec --backend $BACKEND --ranks $r --check: $(echo "$out" | tail -1)"
            else
                n_ok=$((n_ok + 1))
            fi
        done
    done
    say "gpu-check: --check passed for $n_ok runs (every example, R in {1, 4}, L=$CHECK_SEQ, batch 2, $BACKEND)"
fi

# ---------- (grad) gradients of every example against the f64 reference ----------
if has_section grad; then
    TESTS_LOG="$RESULTS/tests.log"
    touch "$TESTS_LOG"
    if [ "$SMOKE" = 1 ]; then GRAD_SEQ=130; else GRAD_SEQ=1000; fi
    n_ok=0
    for spec in examples/*.mix; do
        # Which backends run this spec's backward (`mixc check`), and why not.
        why="$("$MIXC" check --json "$spec" | python3 -c '
import json, sys
row = json.loads(sys.stdin.readline())
want = sys.argv[1]
for b in row["backends"]:
    if b["target"] == want or (want == "cuda" and b["target"] == "cuda sm_90"):
        print("" if b["backward"] else (b["backward_reason"] or "unsupported"))
' "$BACKEND")"
        if [ -n "$why" ]; then
            not_exercised "grad $spec on $BACKEND: $why"
            continue
        fi
        for r in 1 4; do
            set +e
            out="$("$MIXC" run "$spec" --backend "$BACKEND" --seq "$GRAD_SEQ" --batch 2 --ranks "$r" --grad --check --json 2>&1)"
            rc=$?
            set -e
            echo "$spec --grad R=$r: $out" >>"$TESTS_LOG"
            if [ $rc -ne 0 ]; then
                fail "mixc run $spec --backend $BACKEND --ranks $r --grad --check: $(echo "$out" | tail -1)"
            else
                n_ok=$((n_ok + 1))
            fi
        done
    done
    say "gpu-check: --grad --check passed for $n_ok runs (every example, R in {1, 4}, L=$GRAD_SEQ, batch 2, $BACKEND)"
    # Ring backward overhead: the backward alone, R = 1 vs 4, one shape.
    if [ "$SMOKE" = 1 ]; then RING_SEQ=256; else RING_SEQ=16384; fi
    for r in 1 4; do
        set +e
        out="$("$MIXC" bench examples/causal_gqa_llama3.mix --backend "$BACKEND" --seq "$RING_SEQ" --ranks "$r" --pass bwd --reps 3 --warmup 1 --json 2>&1)"
        rc=$?
        set -e
        echo "ring bwd R=$r: $out" >>"$TESTS_LOG"
        if [ $rc -ne 0 ]; then
            fail "mixc bench --pass bwd --ranks $r: $(echo "$out" | tail -1)"
        else
            med="$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["median_s"])')"
            say "gpu-check: ring backward causal_gqa_llama3 L=$RING_SEQ R=$r: ${med} s"
        fi
    done
    if [ "$BACKEND" = cuda ]; then
        not_exercised "grad: multi-process backward (WORLD_SIZE > 1): not implemented on CUDA yet"
    fi
fi

# ---------- (2)-(6) peers ----------
PEER_SECTIONS="$(echo "$SECTIONS" | tr ',' '\n' | grep -v -e '^check$' -e '^grad$' | paste -sd, - || true)"
PEERS_RC=0
if [ -n "$PEER_SECTIONS" ]; then
    PY=(python3 scripts/bench/peers.py --mixc "$MIXC" --out-dir "$RESULTS" --sections "$PEER_SECTIONS")
    if [ "$SMOKE" = 1 ]; then
        # The scripts must at least compile and parse their arguments.
        for f in scripts/bench/*.py; do
            python3 -m py_compile "$f" || fail "py_compile $f"
            python3 "$f" --help >/dev/null || fail "$f --help"
        done
        "${PY[@]}" --dry-run >>"$LOG" 2>&1 || fail "peers.py --dry-run"
        PY+=(--smoke)
    elif [ "$QUICK" = 1 ]; then
        PY+=(--seqs 1k,4k,16k,64k --reps 5)
    fi
    say "gpu-check: ${PY[*]} ${PEER_ARGS[*]:-}"
    set +e
    PYTHONUNBUFFERED=1 "${PY[@]}" ${PEER_ARGS[@]+"${PEER_ARGS[@]}"} 2>&1 | tee -a "$LOG"
    PEERS_RC=${PIPESTATUS[0]}
    set -e
    [ "$PEERS_RC" = 0 ] || fail "peers.py exited $PEERS_RC (errors above)"
fi

# ---------- summary ----------
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "mixc: $MIXC ($("$MIXC" --version)); backend $BACKEND; sections $SECTIONS"
    if [ "$USES_DIST" = 1 ]; then
        echo "dist/ commit: $(python3 -c 'import json;print(json.load(open("dist/MANIFEST.json"))["commit"])')"
    fi
    echo
    [ -f "$RESULTS/peers.md" ] && cat "$RESULTS/peers.md"
    echo
    for x in ${NOT_EXERCISED[@]+"${NOT_EXERCISED[@]}"}; do echo "- not exercised: $x"; done
    if [ -f "$RESULTS/peers.json" ]; then
        python3 - "$RESULTS/peers.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
groups = {}
for x in doc.get("not_exercised", []):
    case, why = x.split(": ", 1)
    groups.setdefault((case.split(" ")[0], why), 0)
    groups[(case.split(" ")[0], why)] += 1
for (section, why), n in sorted(groups.items()):
    print(f"- not exercised: {section}: {why} ({n} cases)")
for name, ok in (doc.get("targets") or {}).items():
    print(f"- target: {name}: {'met' if ok else 'NOT met' if ok is False else 'not measured'}")
PY
    fi
    for x in ${FAILED[@]+"${FAILED[@]}"}; do echo "- FAILED: $x"; done
} >"$RESULTS/gpu-check.md"
say "gpu-check: wrote $RESULTS/gpu-check.md"
if [ ${#NOT_EXERCISED[@]} -gt 0 ]; then
    say "gpu-check: ${#NOT_EXERCISED[@]} item(s) NOT EXERCISED (listed above)"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    say "gpu-check: FAILED (${#FAILED[@]}): ${FAILED[*]}"
    exit 1
fi
say "gpu-check: OK"
