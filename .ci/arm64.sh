#!/usr/bin/env bash
# CI stage: the whole package on arm64 (docs/arm64.md).
# 1. an arm64 Debian root (debootstrap minbase from this machine's own Debian mirror; arm64 programs
#    run through qemu-user-static's binfmt handler), a venv in it with edgepanel's dependencies;
# 2. edgepanel installed there from this checkout, its C extension compiled there by the root's gcc
#    for baseline armv8-a, then disassembled here: nothing beyond armv8-a outside the dotprod code;
# 3. a smoke set run twice, as a Raspberry Pi 4 (QEMU_CPU=cortex-a72: no dot product) and as a Pi 5
#    (cortex-a76): kernel tests, convert, generate (greedy and sampled), bench, three fine-tuning
#    steps, and the logits of one tiny model file, which must equal this x86 host's bit for bit; no
#    step may die of SIGILL.
# Needs root (chroot, mount) and debootstrap, qemu-user-static, binfmt-support, gcc-aarch64-linux-gnu,
# binutils-aarch64-linux-gnu (.ci/run installs them), and the dev extra on the host (torch builds
# the tiny checkpoint).  Locally the root with its venv is cached in ~/.cache/edgepanel-ci/ (one
# tarball, keyed by the Debian release, packages and Python requirements); in CI it is built fresh.
#     bash .ci/arm64.sh          EDGEPANEL_CI_KEEP=1: keep the work directory (its path is printed)
set -Eeuo pipefail
trap '[ "$BASH_SUBSHELL" = 0 ] && echo "arm64 stage FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
SRC=$PWD
start=$SECONDS

ulimit -c 0  # the SIGILL probe below must not leave a core file
say() { echo "[arm64 $((SECONDS - start))s] $*"; }
die() { echo "arm64 stage FAILED: $*" >&2; exit 1; }

CPUS=(cortex-a72 cortex-a76)                               # Raspberry Pi 4, Raspberry Pi 5
declare -A KERNELS=([cortex-a72]=neon [cortex-a76]=neon_dotprod)  # what each must choose at run time
DEBS=python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
CACHE=${EDGEPANEL_CI_CACHE:-$HOME/.cache/edgepanel-ci}
ROOT_FORMAT=1  # bump when what the cached root holds changes in a way the key does not see

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
[ -n "$SUITE" ] || die "cannot tell this machine's Debian release from /etc/os-release"
for tool in debootstrap qemu-aarch64-static update-binfmts aarch64-linux-gnu-objdump git python; do
    command -v "$tool" >/dev/null || die "$tool not found (.ci/run installs it with apt-get)"
done
git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1 || die "$SRC is not a git checkout"

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/edgepanel-arm64.XXXXXX")
ROOT=$WORK/root
HOST=$WORK/host
unmount_root() {  # everything mounted under the root: ours (/proc), debootstrap's if it was stopped
    local m
    for m in $(awk -v root="$ROOT/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount "$m" || umount -l "$m"
    done
}
cleanup() {
    unmount_root
    if [ -n "${EDGEPANEL_CI_KEEP:-}" ]; then
        echo "arm64: kept $WORK"
    else
        rm -rf --one-file-system "$WORK"  # never crosses into a mount left behind
    fi
}
trap cleanup EXIT

# ---- emulation --------------------------------------------------------------------------------
# qemu-user-static registers aarch64 with the F flag (the interpreter is opened once, at
# registration), so programs inside the root need no qemu of their own.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
fi
if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -qx enabled /proc/sys/fs/binfmt_misc/status || die "binfmt_misc is disabled on this machine"
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 ||
    die "qemu-aarch64 is registered without the F flag: install qemu-user-static"

# in_root CPU CMD...: CMD inside the root as that CPU, in / (so that Python imports the installed
# edgepanel, not the copy of the checkout in /src), with a clean environment.
# qemu reads QEMU_CPU from the environment it is started with, which its children inherit.
in_root() {
    local cpu=$1
    shift
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/bin:/bin \
        QEMU_CPU="$cpu" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_COMPILE=1 "$@"
}

# step CPU NAME CMD...: in_root, output shown (only kept when STEP_QUIET is set), a death by signal
# named, SIGILL above all; the last lines of the output on any failure
step() {
    local cpu=$1 name=$2 t0=$SECONDS rc
    shift 2
    local log="$WORK/logs/$cpu.${name// /_}.log"
    mkdir -p "$WORK/logs"
    { in_root "$cpu" "$@" 2>&1 && echo 0 >"$log.rc" || echo $? >"$log.rc"; } |
        if [ -n "${STEP_QUIET:-}" ]; then cat >"$log"; else tee "$log"; fi
    rc=$(cat "$log.rc")
    local why=""
    if [ "$rc" = 132 ] || grep -q "uncaught target signal 4" "$log"; then
        why="died of SIGILL: an instruction this CPU does not have"
    elif [ "$rc" -gt 128 ]; then
        why="was killed by signal $((rc - 128))"
    elif [ "$rc" != 0 ]; then
        why="failed with exit code $rc"
    fi
    if [ -n "$why" ]; then
        echo "---- last lines of $name as $cpu:" >&2
        tail -30 "$log" >&2
        die "$name as $cpu $why"
    fi
    say "$cpu: $name ok ($((SECONDS - t0)) s)"
}

# ---- the root: debootstrap + venv with the dependencies, cached locally --------------------------
debian_mirror() {  # the URI this machine's apt sources give for $SUITE (deb822 or one-line style)
    if [ -n "${EDGEPANEL_CI_MIRROR:-}" ]; then echo "$EDGEPANEL_CI_MIRROR"; return; fi
    {
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -e "$f" ] || continue
            awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
                { uri = ""; ok = 0
                  for (i = 1; i <= NF; i++) {
                      if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                      if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1 }
                  }
                  if (ok && uri != "") print uri }' "$f"
        done
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -nE "s/^deb([[:space:]]+\[[^]]*\])?[[:space:]]+([^[:space:]]+)[[:space:]]+$SUITE([[:space:]].*)?$/\2/p"
    } | awk 'NR == 1'  # reads to the end: head would close the pipe under pipefail
}

requirements() {  # edgepanel's run-time and build requirements, and pytest, one per line; NumPy
    # pinned to the host's, so that conversion and training can be compared bit for bit
    python - "$SRC/pyproject.toml" <<'EOF'
import sys, tomllib
import numpy
meta = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(meta["project"]["dependencies"] + meta["build-system"]["requires"] + ["pytest"]
                + [f"numpy=={numpy.__version__}"]))
EOF
}

build_root() {
    local mirror
    mirror=$(debian_mirror) || true
    [ -n "$mirror" ] || die "no Debian mirror for $SUITE in /etc/apt/sources.list*; set EDGEPANEL_CI_MIRROR"
    say "debootstrap $SUITE arm64 ($DEBS) from $mirror"
    debootstrap --arch=arm64 --variant=minbase --include="$DEBS" "$SUITE" "$ROOT" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -40 "$WORK/debootstrap.log"; die "debootstrap failed (log above)"; }
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"  # see below
    mkdir -p "$ROOT/src"
    mount -t proc proc "$ROOT/proc"
    say "venv and dependencies (aarch64 wheels from PyPI)"
    requirements >"$ROOT/tmp/requirements.txt"
    step cortex-a72 "python3 -m venv" /usr/bin/python3 -m venv /opt/venv
    step cortex-a72 "pip install dependencies" pip install -q -r /tmp/requirements.txt
}

key=$( { echo "$ROOT_FORMAT $SUITE $DEBS"; requirements; } | sha256sum | cut -c1-16)
TARBALL=$CACHE/arm64-$SUITE-$key.tar
if [ -z "${CI:-}" ] && [ -f "$TARBALL" ]; then
    say "root from the cache: $TARBALL"
    mkdir -p "$ROOT"
    tar --numeric-owner -xpf "$TARBALL" -C "$ROOT" || die "cannot unpack $TARBALL (delete it to rebuild)"
    mount -t proc proc "$ROOT/proc"
else
    build_root
    if [ -z "${CI:-}" ]; then
        say "caching the root in $TARBALL"
        mkdir -p "$CACHE"
        unmount_root
        rm -f "$CACHE"/arm64-*.tar.partial
        tar --numeric-owner -cf "$TARBALL.partial" -C "$ROOT" . && mv "$TARBALL.partial" "$TARBALL"
        find "$CACHE" -maxdepth 1 -name 'arm64-*.tar' ! -name "$(basename "$TARBALL")" -delete
        mount -t proc proc "$ROOT/proc"
    fi
fi
# pip verifies PyPI with this machine's CA bundle (the root's may not hold the one in use here)
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"

# ---- the tiny model, converted here; the x86 reference results ----------------------------------
say "tiny checkpoint and the x86 results (host)"
mkdir -p "$HOST"
python - "$SRC/tests" "$HOST/hf" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import hf_models
hf_models.checkpoint_with_tokenizer(Path(sys.argv[2]), "llama")
EOF
for i in $(seq 20); do
    echo "the cat sat on the mat. once upon a time there was a dog. hello world, how are you?"
done >"$HOST/train.txt"
# the same commands here and in the root; convert runs beside hf/ in both, as the model file
# records the source path as given
CONVERT=(convert hf m.ep --planes 2 --group 32 --no-calib --scales u8 -q)
GENERATE=(generate m.ep -p "once upon a time" -n 12 --temperature 0 -q -t 1)
# sampled: the C sampler's exp and sums are the same operations on every machine
SAMPLED=(generate m.ep -p "once upon a time" -n 24 --temperature 1.2 --top-p 0.9 --min-p 0.02 --seed 7 -q -t 1)
FINETUNE=(finetune m.ep --data train.txt --out tuned.ep --steps 3 --batch 2 --seq-len 32 --eval-every 0 --seed 1 -q -t 1)
host_python() { (cd "$HOST" && PYTHONPATH="$SRC" python "$@"); }
host_python -c 'from edgepanel.kernels import native; assert native.lib is not None' 2>/dev/null ||
    die "this checkout's C extension is not built for the host (pip install -e . builds it)"
host_python -m edgepanel "${CONVERT[@]}"
host_python -m edgepanel "${GENERATE[@]}" >"$HOST/generate.txt"
host_python -m edgepanel "${SAMPLED[@]}" >"$HOST/sampled.txt"
host_python -m edgepanel "${FINETUNE[@]}"
host_python "$SRC/.ci/arm64_smoke.py" logits m.ep logits.npy \
    --isa "$(host_python -c 'from edgepanel import kernels; print(kernels.info().split("/")[1])')"

# ---- edgepanel from this checkout, built inside the root ----------------------------------------
say "install edgepanel from the checkout (C extension compiled in the root)"
(git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) |
    tar -xf - -C "$ROOT/src"
mkdir -p "$ROOT/smoke"
cp -r "$HOST/hf" "$HOST/train.txt" "$ROOT/smoke/"
cp "$HOST/m.ep" "$ROOT/smoke/x86.ep"  # the logits of this one file are compared
STEP_QUIET=1 step cortex-a72 "pip install edgepanel" pip install -v --no-build-isolation /src
step cortex-a72 "C extension built" python -c '
from edgepanel.kernels import native
assert native.lib is not None, f"the C extension was not built: {native.IMPORT_ERROR}"
print("compiled variants:", ",".join(native.compiled_isas()))'
so=$(find "$ROOT/opt/venv/lib" -path '*/edgepanel/kernels/_ep*.so' -print -quit)
[ -n "$so" ] || die "no edgepanel/kernels/_ep*.so in the root's venv"
say "disassembly of the extension built in the root"
python tools/arm64_isa.py --require-dotprod "$so" ||
    die "the extension holds instructions a Raspberry Pi 4 does not have (listed above)"

# ---- the emulator kills a Pi 4 that meets a dot product: the SIGILL checks below can fail --------
cat >"$ROOT/smoke/sdot.c" <<'EOF'
int main(void) { __asm__ volatile("sdot v0.4s, v1.16b, v2.16b" ::: "v0"); return 0; }
EOF
step cortex-a76 "compile sdot probe" gcc -march=armv8.2-a+dotprod -o /smoke/sdot /smoke/sdot.c
in_root cortex-a76 /smoke/sdot || die "the sdot probe fails as a cortex-a76"
rc=0
in_root cortex-a72 /smoke/sdot 2>/dev/null || rc=$?
[ "$rc" = 132 ] || die "the sdot probe as a cortex-a72 exited $rc, expected SIGILL (132): the emulated Pi 4 is not one"
say "sdot probe: runs as cortex-a76, SIGILL as cortex-a72"

# ---- the smoke set, as a Pi 4 and as a Pi 5 ----------------------------------------------------
# kernel tests: every variant against the NumPy reference, without the 250 shape sweeps of the
# float and exact-integer tests (kernel_check covers those under qemu in tests/test_c_variants.py)
# but with their every-(group, planes) shape; emulated Python runs 5-50x slower than native.
KERNEL_TESTS=(/src/tests/test_c_binding.py /src/tests/test_kernels.py -k "not gemm_float and not u8_scales and (not exact_integers or 40x333)")
for cpu in "${CPUS[@]}"; do
    isa=${KERNELS[$cpu]}
    out=/smoke/$cpu
    mkdir -p "$ROOT$out"
    cp -r "$ROOT/smoke/hf" "$ROOT/smoke/train.txt" "$ROOT$out/"
    say "---- $cpu: expects kernels c/$isa"
    step "$cpu" "kernel variant" python -c "
import platform
from edgepanel import kernels
from edgepanel.kernels import native
print(platform.machine(), kernels.info(), 'runnable:', ','.join(native.runnable_isas()))
assert platform.machine() == 'aarch64' and kernels.info() == 'c/$isa', kernels.info()
assert ('neon_dotprod' in native.runnable_isas()) == ('$isa' == 'neon_dotprod')"
    step "$cpu" "kernel tests" env EDGEPANEL_BACKEND=c pytest -q -p no:cacheprovider -x "${KERNEL_TESTS[@]}"
    # the steps read the model file converted here (the comparisons below show it is x86's too),
    # the logits the one converted on x86
    step "$cpu" "convert" env -C "$out" edgepanel "${CONVERT[@]}"
    step "$cpu" "generate" env -C "$out" sh -c 'edgepanel "$@" >generate.txt' sh "${GENERATE[@]}"
    step "$cpu" "sampled generation" env -C "$out" sh -c 'edgepanel "$@" >sampled.txt' sh "${SAMPLED[@]}"
    if [ -f "$SRC/edgepanel/cli/bench.py" ]; then  # the checkout has the command: it must work
        step "$cpu" "bench" env -C "$out" edgepanel bench m.ep -p 16 -n 8 -t 1 -r 2 --breakdown-rounds 2 --json bench.json
        step "$cpu" "bench results" python /src/.ci/arm64_smoke.py bench "$out/bench.json" --isa "$isa" --machine aarch64
    else
        say "$cpu: this checkout has no edgepanel bench: skipped"
    fi
    step "$cpu" "finetune 3 steps" env -C "$out" edgepanel "${FINETUNE[@]}"
    step "$cpu" "logits" python /src/.ci/arm64_smoke.py logits /smoke/x86.ep "$out/logits.npy" --isa "$isa"
done

# ---- the same file, the same bits: Pi 4, Pi 5, x86 -----------------------------------------------
say "---- comparisons"
A72=$ROOT/smoke/cortex-a72
A76=$ROOT/smoke/cortex-a76
same() {  # same WHAT NAME: $HOST/NAME, $A72/NAME and $A76/NAME equal bit for bit
    python .ci/arm64_smoke.py same "$HOST/$2" "$A72/$2" "$A76/$2" >/dev/null ||
        die "$1 ($2) differs between x86, cortex-a72 and cortex-a76"
    say "the same bits on x86, cortex-a72 and cortex-a76: $1 ($2)"
}
same "the logits of the model file converted on x86 (the C engine)" logits.npy
same "the converted model file (NumPy $(python -c 'import numpy; print(numpy.__version__)') on both)" m.ep
same "greedy generation" generate.txt
same "sampled generation (seed 7)" sampled.txt
same "the model after three fine-tuning steps" tuned.ep
say "arm64 stage done in $((SECONDS - start)) s (removing the root follows)"
