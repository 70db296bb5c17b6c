#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust
# toolchain and no network: the release `mixc` binary and the GPU test
# executables (runtime/tests/cuda_backend.rs and nvrtc_*.rs), stripped, in
# dist/ (git-ignored) with dist/MANIFEST.json (commit, build root, sizes,
# sha256). Carry dist/ to the machine with the repository and run
# `scripts/gpu-check.sh` there. Fails when dist/ exceeds DIST_LIMIT_MIB
# (default 60: the device tool carries at most 64 MiB in all).
#
#   scripts/build-for-device.sh
set -euo pipefail
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build-for-device: unknown argument $1 (it takes none; see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
LIMIT_MIB="${DIST_LIMIT_MIB:-60}"

# Test targets to carry: the ones that need a GPU or NVRTC.
TESTS=()
for f in runtime/tests/cuda_backend.rs runtime/tests/nvrtc_*.rs; do
    [ -f "$f" ] && TESTS+=(--test "$(basename "$f" .rs)")
done
[ ${#TESTS[@]} -gt 0 ] || { echo "build-for-device: no GPU test sources found" >&2; exit 1; }

echo "build-for-device: cargo build --release -p mixc-cli" >&2
cargo build --release -p mixc-cli
echo "build-for-device: cargo test --release -p mixc-runtime ${TESTS[*]} --no-run" >&2
MSGS="$(mktemp)"
trap 'rm -f "$MSGS"' EXIT
cargo test --release -p mixc-runtime "${TESTS[@]}" --no-run --message-format=json >"$MSGS"

rm -rf dist
mkdir -p dist/tests
cp target/release/mixc dist/mixc
# One executable per test target; cargo names them <target>-<hash>.
python3 - "$MSGS" <<'PY'
import json, shutil, sys
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        name = m["target"]["name"]
        if name not in seen:
            seen.add(name)
            shutil.copy(m["executable"], f"dist/tests/{name}")
if not seen:
    sys.exit("build-for-device: cargo reported no test executables")
PY
strip dist/mixc dist/tests/*

python3 - "$LIMIT_MIB" <<'PY'
import datetime, hashlib, json, os, subprocess, sys
limit = int(sys.argv[1]) * 2**20
def git(*a):
    return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
files = []
for root, _, names in os.walk("dist"):
    for n in sorted(names):
        p = os.path.join(root, n)
        if n == "MANIFEST.json":
            continue
        data = open(p, "rb").read()
        files.append({"path": os.path.relpath(p, "dist"), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
total = sum(f["bytes"] for f in files)
manifest = {
    "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": git("rev-parse", "HEAD"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    # Test binaries read examples/ relative to this folder (CARGO_MANIFEST_DIR
    # is compiled in); gpu-check.sh links it to the checkout when it is absent.
    "build_root": os.getcwd(),
    "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip(),
    "total_bytes": total,
    "files": files,
}
json.dump(manifest, open("dist/MANIFEST.json", "w"), indent=2)
for f in files:
    print(f"  {f['path']}: {f['bytes'] / 2**20:.1f} MiB")
print(f"build-for-device: dist/ holds {total / 2**20:.1f} MiB (limit {limit // 2**20} MiB)")
if total > limit:
    sys.exit(f"build-for-device: dist/ is over {limit // 2**20} MiB; the device tool cannot carry it")
PY
