#!/usr/bin/env bash
# The runtime on Linux aarch64, emulated: a Debian bookworm arm64 chroot (debootstrap + qemu-user-static), the base
# install in a venv inside it, and optionally the same short training run on aarch64 and on this host, loss by loss.
# On demand, not part of the test suite (emulation is slow). Needs root and a Debian/Ubuntu host.
#
#   tools/check_aarch64.sh                          build/refresh the rootfs and the venv, print the versions inside
#   tools/check_aarch64.sh BUNDLE DATA [STEPS] [-- EXTRA TRAIN FLAGS]
#                                                   and train BUNDLE on DATA for STEPS (default 5) steps in the chroot
#                                                   and on the host; fail if a step's loss differs by more than 1e-5
#
# Environment: LARS_ARM64_ROOT (rootfs folder, default /var/tmp/lars-arm64-rootfs; built once, reused),
#   LARS_ARM64_MIRROR (Debian mirror for debootstrap; default: the host's apt source for bookworm),
#   LARS_HOST_LARS_ORT (host lars-ort, default REPO/.venv/bin/lars-ort), LARS_TOLERANCE (default 1e-5).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${LARS_ARM64_ROOT:-/var/tmp/lars-arm64-rootfs}
SUITE=bookworm
HOST_LARS_ORT=${LARS_HOST_LARS_ORT:-$REPO/.venv/bin/lars-ort}
TOL=${LARS_TOLERANCE:-1e-5}
IN=/opt/lars                   # inside the chroot: src/ (the repo's sources), venv/, work/ (bundle, data, run)

BUNDLE=${1:-}
DATA=${2:-}
STEPS=${3:-5}
EXTRA=()
if [ $# -gt 3 ]; then
  shift 3
  if [ "${1:-}" = "--" ]; then shift; fi
  EXTRA=("$@")
fi
if [ -n "$BUNDLE" ] && [ -z "$DATA" ]; then
  echo "usage: $0 [BUNDLE DATA [STEPS] [-- EXTRA TRAIN FLAGS]]" >&2; exit 2
fi
case $STEPS in
  '' | *[!0-9]*) echo "check_aarch64: STEPS must be a number, got '$STEPS'" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "check_aarch64: needs root (debootstrap, chroot, mount)" >&2; exit 2; }
case $ROOT in
  /*) ;;
  *) echo "check_aarch64: LARS_ARM64_ROOT must be an absolute path" >&2; exit 2 ;;
esac
case ${ROOT%/} in
  "" | /usr | /var | /tmp | /var/tmp | /root | /home | /opt | /srv | /mnt)
    echo "check_aarch64: refusing LARS_ARM64_ROOT=$ROOT" >&2; exit 2 ;;
esac
ROOT=${ROOT%/}
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -n 9 || { echo "check_aarch64: another run holds $ROOT.lock" >&2; exit 1; }

log() { printf '[check_aarch64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- mounts we make, undone on exit (in reverse order) -------------------------------------------------------------
MOUNTS=()
HOST_RUN=""
cleanup() {
  local i
  if [ -n "$HOST_RUN" ]; then rm -rf "$HOST_RUN"; fi
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

umount_under() {  # every mount at or below $1, deepest first (left behind by an interrupted debootstrap or run)
  local dir m
  dir=$(realpath -m "$1")
  awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

# ---- (i) host tools: debootstrap, qemu-user-static, binfmt-support; the aarch64 binfmt handler enabled ---------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
  update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
fi
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "check_aarch64: no binfmt handler for aarch64" >&2; exit 1; }

# ---- (ii) the arm64 rootfs, built once ----------------------------------------------------------------------------
host_mirror() {  # the host's apt source for $SUITE (deb822 .sources or one-line .list), else debootstrap's default
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" '
      /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
      END { if (uri != "" && ok) print uri }' "$f"
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i+1) == s) print $i; break } }'
}

if [ ! -f "$ROOT/.lars-rootfs-ok" ]; then
  if [ -e "$ROOT" ]; then
    echo "check_aarch64: $ROOT exists but is not a finished rootfs of this script; remove it first" >&2; exit 1
  fi
  mirror=${LARS_ARM64_MIRROR:-$(host_mirror | grep -v security | head -n1 || true)}
  partial="$ROOT.partial"
  umount_under "$partial"
  rm -rf --one-file-system "$partial"
  log "debootstrap --arch=arm64 $SUITE into $partial (several minutes, emulated second stage)"
  t0=$(date +%s)
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$partial" ${mirror:+"$mirror"} >"$partial.log" 2>&1 || {
      tail -n 30 "$partial.log" >&2; umount_under "$partial"; exit 1; }
  umount_under "$partial"
  mv "$partial" "$ROOT"
  mv "$partial.log" "$ROOT/.lars-debootstrap.log"
  echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - t0 )) s" >"$ROOT/.lars-rootfs-ok"
  log "rootfs built in $(( $(date +%s) - t0 )) s"
else
  log "reusing rootfs $ROOT ($(cat "$ROOT/.lars-rootfs-ok"))"
fi
# Without binfmt's F flag the kernel looks for the interpreter inside the chroot.
cp -f /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static"

# ---- (iii) /proc, name resolution, the host's pip configuration ------------------------------------------------------
umount_under "$ROOT"           # whatever an interrupted run left mounted (the lock keeps other runs out)
mount -t proc proc "$ROOT/proc"
MOUNTS+=("$ROOT/proc")
# /sys stays unmounted: with it, onnxruntime's cpuinfo finds the host's CPUs in /sys, then parses the host's x86
# /proc/cpuinfo as ARM's and segfaults (qemu-user does not emulate /proc/cpuinfo for aarch64). Without it, ORT prints
# "Error in cpuinfo: failed to parse ..." and "cpuinfo_initialize failed" and runs on: an emulation artefact.
cp -fL /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
if [ -f /etc/hosts ]; then cp -f /etc/hosts "$ROOT/etc/hosts"; fi

copy_in() {  # copy_in HOST_PATH CHROOT_PATH: a file or a folder, if it exists on the host
  [ -e "$1" ] || return 0
  mkdir -p "$(dirname "$ROOT$2")"
  rm -rf "${ROOT:?}$2"
  cp -a "$1" "$ROOT$2"
  log "copied $1 into the chroot"
}
copy_in /etc/pip.conf /etc/pip.conf
copy_in /etc/xdg/pip /etc/xdg/pip
copy_in "$HOME/.config/pip" /root/.config/pip
copy_in "$HOME/.pip" /root/.pip

# Files and local folders that configuration names (a CA bundle, constraints, find-links, file:// indexes), at the
# same paths inside: files are copied (the host's CA bundle replaces the chroot's: it may hold the CA a proxy on the
# way to the registries signs with); local package folders are bind-mounted read-only.
pip_conf_files=()
for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
  if [ -f "$f" ]; then pip_conf_files+=("$f"); fi
done
referenced=$( { [ ${#pip_conf_files[@]} -gt 0 ] && sed -nE 's/^[[:space:]]*[A-Za-z_-]+[[:space:]]*=[[:space:]]*(.*)$/\1/p' \
                  "${pip_conf_files[@]}"
                printf '%s\n' "${PIP_CERT:-}" "${PIP_FIND_LINKS:-}" "${PIP_EXTRA_INDEX_URL:-}" "${PIP_INDEX_URL:-}" \
                  "${PIP_CONSTRAINT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}"; } |
              tr ' ' '\n' | sed -E 's#^file://##' | grep '^/' | sort -u || true)
for p in $referenced; do
  p=${p%/}
  case $p in /etc/xdg/pip* | /etc/pip.conf) continue ;; esac
  if [ -f "$p" ]; then
    mkdir -p "$(dirname "$ROOT$p")"; cp -fL "$p" "$ROOT$p"
  elif [ -d "$p" ]; then
    if [ "$(basename "$p")" = simple ]; then p=$(dirname "$p"); fi  # an index: mount its root
    if mountpoint -q "$ROOT$p"; then continue; fi
    mkdir -p "$ROOT$p"
    mount --bind "$p" "$ROOT$p"; MOUNTS+=("$ROOT$p")
    mount -o remount,bind,ro "$ROOT$p" 2>/dev/null || true
    log "bind-mounted $p (read-only) into the chroot"
  fi
done

# A clean environment inside, plus the host's pip, TLS and proxy variables.
CHROOT_ENV=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
            TOKENIZERS_PARALLELISM=false)
while IFS='=' read -r name _; do
  case $name in
    PIP_* | SSL_CERT_FILE | SSL_CERT_DIR | REQUESTS_CA_BUNDLE | http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY)
      CHROOT_ENV+=("$name=${!name}") ;;
  esac
done < <(env)
in_chroot() { chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}" "$@"; }

# ---- (iv) the repo's runtime sources and the base install in a venv inside --------------------------------------------
# pyproject.toml lists lars_export and lars_artifacts too, so their sources go in (lars_export is never imported).
rm -rf "${ROOT:?}$IN/src"
mkdir -p "$ROOT$IN/src" "$ROOT$IN/work"
(cd "$REPO" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md runtime artifacts export \
   $(ls LICENSE* 2>/dev/null || true)) | tar -xf - -C "$ROOT$IN/src"
stamp=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$ROOT$IN/venv/.lars-stamp" 2>/dev/null || true)" != "$stamp" ]; then
  log "pip install -e (base install) in $IN/venv, emulated (several minutes)"
  t0=$(date +%s)
  in_chroot python3 -m venv --clear "$IN/venv"
  # (pip's notes on the host's local index folders that lack a package are dropped)
  in_chroot "$IN/venv/bin/python" -m pip install -q --disable-pip-version-check -e "$IN/src" 2>&1 |
    { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
  echo "$stamp" >"$ROOT$IN/venv/.lars-stamp"
  log "installed in $(( $(date +%s) - t0 )) s"
fi

FORBIDDEN_PROBE='import importlib.util as u; bad = [m for m in ("torch", "transformers", "optimum", "peft") if u.find_spec(m)]; assert not bad, bad'
in_chroot "$IN/venv/bin/python" -c "$FORBIDDEN_PROBE"
ARCH_IN=$(in_chroot uname -m)
PY_IN=$(in_chroot "$IN/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')
ORT_IN=$(in_chroot "$IN/venv/bin/python" -c 'import onnxruntime, lars_ort; print(onnxruntime.__version__)')
NP_IN=$(in_chroot "$IN/venv/bin/python" -c 'import numpy; print(numpy.__version__)')
echo "date (UTC):            $(date -u +'%F %T')"
echo "host:                  $(uname -m), $(uname -sr)"
echo "chroot uname -m:       $ARCH_IN"
echo "chroot python:         $PY_IN"
echo "chroot onnxruntime:    $ORT_IN"
echo "chroot numpy:          $NP_IN"
[ "$ARCH_IN" = aarch64 ] || { echo "check_aarch64: the chroot is not aarch64 ($ARCH_IN)" >&2; exit 1; }

if [ -z "$BUNDLE" ]; then
  log "no BUNDLE given: set-up checked, nothing trained"
  exit 0
fi

# ---- (v) the same run on aarch64 (emulated) and on the host; losses compared step by step ----------------------------
[ -f "$BUNDLE/manifest.json" ] || { echo "check_aarch64: $BUNDLE is not a bundle (no manifest.json)" >&2; exit 2; }
[ -f "$DATA" ] || { echo "check_aarch64: no data file $DATA" >&2; exit 2; }
[ -x "$HOST_LARS_ORT" ] || { echo "check_aarch64: no host lars-ort at $HOST_LARS_ORT" >&2; exit 2; }
work="$ROOT$IN/work"
rm -rf "${work:?}"/*
cp -a "$BUNDLE" "$work/bundle"
data_name=$(basename "$DATA")           # its extension tells the data format (.txt, .jsonl)
cp -a "$DATA" "$work/$data_name"
FLAGS=(--steps "$STEPS" --batch-size 2 --seq-len 32 --lr 3e-3 --no-progress --seed 0 "${EXTRA[@]}")

log "training $STEPS steps on aarch64 (emulated)"
t0=$(date +%s)
in_chroot "$IN/venv/bin/lars-ort" train "$IN/work/bundle" --data "$IN/work/$data_name" --out "$IN/work/run" "${FLAGS[@]}"
log "aarch64 run took $(( $(date +%s) - t0 )) s"

HOST_RUN=$(mktemp -d /tmp/lars-x86-run.XXXXXX)
log "training $STEPS steps on the host ($HOST_LARS_ORT)"
ORT_HOST=$("$(dirname "$HOST_LARS_ORT")/python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || echo '?')
"$HOST_LARS_ORT" train "$BUNDLE" --data "$DATA" --out "$HOST_RUN/run" "${FLAGS[@]}"
echo "host onnxruntime:      $ORT_HOST"

python3 - "$HOST_RUN/run/metrics.jsonl" "$work/run/metrics.jsonl" "$TOL" "$STEPS" <<'EOF'
import json, math, sys

def losses(path):
    out = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out

x86, arm, tol, steps = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
print(f"{'step':>4}  {'x86 loss':>14}  {'aarch64 loss':>14}  {'diff':>10}")
worst, ok = 0.0, sorted(x86) == sorted(arm) == list(range(1, steps + 1))
for step in sorted(set(x86) | set(arm)):
    a, b = x86.get(step, math.nan), arm.get(step, math.nan)
    d = abs(a - b)
    worst = max(worst, d) if not math.isnan(d) else math.inf
    print(f"{step:>4}  {a:>14.8f}  {b:>14.8f}  {d:>10.2e}")
if not ok:
    print(f"steps differ: x86 {sorted(x86)}, aarch64 {sorted(arm)}, expected 1..{steps}")
ok = ok and worst <= tol
print(f"max |diff| {worst:.2e} (tolerance {tol:g}): {'OK' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
