#!/usr/bin/env bash
# An emulated linux/aarch64 Python 3.11 with npcam's runtime packages, for tests/test_aarch64.py.
#
#   bash scripts/arm64_env.sh [PYTHON]
#
# Everything goes into ${NPCAM_ARM64_CACHE:-~/.cache/npcam/arm64}, outside the repo:
#   qemu-x86_64    from the same package, for tests/test_cpus.py: this machine's Python on an emulated x86 CPU model
#                  (Haswell: AVX2 without VNNI or AVX-512, whatever the host has)
#   qemu-aarch64   Debian trixie's static qemu-user (>= 8.1: bookworm's 7.2 shows onnxruntime the host's
#                  x86 /proc/cpuinfo and it crashes), unless one >= 8.1 is already on PATH
#   root/          Debian bookworm's arm64 python3.11 and the libraries it needs, unpacked with dpkg -x
#   site/          aarch64 wheels (manylinux_2_28) of numpy, pillow and onnxruntime, the versions PYTHON has
#                  (default .venv/bin/python, else python3), so x86 and aarch64 differ only in the CPU
#   ready          written last: what was set up; a second run with the same versions returns at once
# The host's package state is never touched: apt runs with its own configuration, sources, lists, cache and
# an empty dpkg status under the cache folder, only to download; nothing is installed. Exits 1 with one line saying why
# when apt-get, the Debian archive or PyPI cannot be had; the test then skips, naming this script.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE=${NPCAM_ARM64_CACHE:-$HOME/.cache/npcam/arm64}
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
die() { echo "arm64_env: cannot set up the emulated aarch64 Python in $CACHE: $*" >&2; exit 1; }

versions=$("$PY" - <<'EOF' 2>/dev/null
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("numpy", "pillow", "onnxruntime")))
EOF
) || die "$PY lacks numpy, pillow or onnxruntime (whose versions the aarch64 wheels follow)"
wanted="wheels: $versions"
ready() {
    [ -f "$CACHE/ready" ] && grep -qxF "$wanted" "$CACHE/ready" && [ -x "$CACHE/qemu-aarch64" ] \
        && [ -x "$CACHE/qemu-x86_64" ] \
        && [ -x "$CACHE/root/usr/bin/python3.11" ] && [ -d "$CACHE/site" ]
}
if ready; then
    echo "$CACHE"
    exit 0
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "no apt-get/dpkg-deb on this machine"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
! command -v flock >/dev/null || flock 9  # two runs at once (e.g. two CI jobs) would unpack over each other
if ready; then  # the other run just finished
    echo "$CACHE"
    exit 0
fi
rm -f "$CACHE/ready"

# The Debian archive this machine's apt already uses (its main archive, not the security one).
mirror=${NPCAM_DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
    2>/dev/null | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)}
[ -n "$mirror" ] || die "no Debian archive in /etc/apt/sources.list*; set NPCAM_DEBIAN_MIRROR"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "no $keyring"

# apt-get with a private configuration for one suite and architecture. APT_CONFIG is read first and points
# apt.conf.d elsewhere, so none of the host's apt configuration applies (its apt.conf.d hooks would run after
# an update, e.g. refreshing the host's AppStream cache); only its proxy and date-check settings are carried
# over. Nothing of the host's apt or dpkg state is read or written.
eval "$(apt-config shell http_proxy_ Acquire::http::Proxy https_proxy_ Acquire::https::Proxy \
    valid_until_ Acquire::Check-Valid-Until check_date_ Acquire::Check-Date 2>/dev/null || true)"
apt_private() {
    local suite=$1 arch=$2 dir="$CACHE/apt/$1-$2"
    shift 2
    mkdir -p "$dir/apt.conf.d" "$dir/sources.list.d" "$dir/preferences.d" "$dir/state/lists/partial" \
        "$dir/cache/archives/partial"
    [ -f "$dir/status" ] || : >"$dir/status"
    echo "deb [arch=$arch signed-by=$keyring] $mirror $suite main" >"$dir/sources.list"
    {
        echo "Dir::Etc::Main \"$dir/apt.conf\"; Dir::Etc::Parts \"$dir/apt.conf.d\";"
        echo "Dir::Etc::SourceList \"$dir/sources.list\"; Dir::Etc::SourceParts \"$dir/sources.list.d\";"
        echo "Dir::Etc::Preferences \"$dir/preferences\"; Dir::Etc::PreferencesParts \"$dir/preferences.d\";"
        echo "Dir::State \"$dir/state\"; Dir::State::status \"$dir/status\"; Dir::Cache \"$dir/cache\";"
        echo "APT::Architecture \"$arch\"; APT::Architectures { \"$arch\"; }; APT::Sandbox::User \"root\";"
        echo "Acquire::Languages \"none\";"
        [ -z "${http_proxy_:-}" ] || echo "Acquire::http::Proxy \"$http_proxy_\";"
        [ -z "${https_proxy_:-}" ] || echo "Acquire::https::Proxy \"$https_proxy_\";"
        [ -z "${valid_until_:-}" ] || echo "Acquire::Check-Valid-Until \"$valid_until_\";"
        [ -z "${check_date_:-}" ] || echo "Acquire::Check-Date \"$check_date_\";"
    } >"$dir/apt.conf"
    APT_CONFIG="$dir/apt.conf" apt-get -q "$@"
}
log="$CACHE/setup.log"
: >"$log"
step() { "$@" >>"$log" 2>&1 || die "'$*' failed (details in $log)"; }

qemu_ok() {  # a qemu-user of version 8.1 or later
    local v
    v=$("$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 8 ] || { [ "$1" -eq 8 ] && [ "$2" -ge 1 ]; }
}
missing=()
for arch in aarch64 x86_64; do
    if [ ! -x "$CACHE/qemu-$arch" ] || ! qemu_ok "$CACHE/qemu-$arch"; then
        rm -f "$CACHE/qemu-$arch"
        for q in "qemu-$arch-static" "qemu-$arch"; do
            if command -v "$q" >/dev/null && qemu_ok "$(command -v "$q")"; then
                ln -s "$(command -v "$q")" "$CACHE/qemu-$arch"
                break
            fi
        done
    fi
    [ -e "$CACHE/qemu-$arch" ] || missing+=("$arch")
done
if [ ${#missing[@]} -gt 0 ]; then
    step apt_private trixie amd64 update --error-on=any
    rm -rf "$CACHE/qemu-deb" && mkdir -p "$CACHE/qemu-deb"
    # trixie's qemu-user is statically linked (qemu-user-static is only a transitional package there).
    (cd "$CACHE/qemu-deb" && step apt_private trixie amd64 download qemu-user)
    for arch in "${missing[@]}"; do
        dpkg-deb --fsys-tarfile "$CACHE"/qemu-deb/qemu-user_*.deb | tar -x -O "./usr/bin/qemu-$arch" \
            >"$CACHE/qemu-$arch.part" || die "no usr/bin/qemu-$arch in trixie's qemu-user"
        chmod +x "$CACHE/qemu-$arch.part" && mv "$CACHE/qemu-$arch.part" "$CACHE/qemu-$arch"
        qemu_ok "$CACHE/qemu-$arch" || die "trixie's qemu-$arch does not run here, or is older than 8.1"
    done
    rm -rf "$CACHE/qemu-deb"
fi

if [ ! -x "$CACHE/root/usr/bin/python3.11" ]; then
    step apt_private bookworm arm64 update --error-on=any
    # An empty dpkg status makes apt resolve every dependency, down to libc6; download only, then dpkg -x.
    step apt_private bookworm arm64 install --download-only -y --no-install-recommends \
        python3.11-minimal libpython3.11-stdlib libstdc++6
    rm -rf "$CACHE/root.part" && mkdir -p "$CACHE/root.part"
    for deb in "$CACHE"/apt/bookworm-arm64/cache/archives/*.deb; do
        dpkg-deb -x "$deb" "$CACHE/root.part" || die "could not unpack $deb"
    done
    rm -rf "$CACHE/root" && mv "$CACHE/root.part" "$CACHE/root"
    rm -f "$CACHE"/apt/bookworm-arm64/cache/archives/*.deb
fi

rm -rf "$CACHE/site.part"
# shellcheck disable=SC2086  # $versions is a list of requirements
step "$PY" -m pip install -q --disable-pip-version-check --target "$CACHE/site.part" \
    --platform manylinux_2_28_aarch64 --implementation cp --python-version 3.11 --only-binary=:all: $versions
rm -rf "$CACHE/site" && mv "$CACHE/site.part" "$CACHE/site"

check=$(QEMU_LD_PREFIX="$CACHE/root" QEMU_CPU=cortex-a72 PYTHONPATH="$CACHE/site" PYTHONNOUSERSITE=1 \
    "$CACHE/qemu-aarch64" "$CACHE/root/usr/bin/python3.11" -c \
    "import platform, numpy, PIL, onnxruntime; print(platform.machine(), platform.python_version())" 2>>"$log") \
    || die "the emulated Python cannot import numpy, pillow and onnxruntime (details in $log)"
{
    echo "$wanted"
    echo "python: $check"
    echo "qemu: $("$CACHE/qemu-aarch64" --version | head -n1)"
    echo "qemu-x86_64: $("$CACHE/qemu-x86_64" --version | head -n1)"
} >"$CACHE/ready"
rm -rf "$CACHE/apt"  # the package lists are needed again only to set up anew
echo "$CACHE"
