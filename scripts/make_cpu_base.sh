#!/usr/bin/env bash
# Make a local, CPU-only stand-in for the CUDA PyTorch base image, for building and testing the
# Dockerfile where no image registry can be reached (CI here):
#
#   Debian bookworm (debootstrap, minbase) + python3 3.11 + a venv at /opt/venv holding the CPU
#   torch wheel, with /opt/venv/bin first on PATH -- the same contract as the official
#   pytorch/pytorch images: `python` and `pip` on PATH, torch importable. `docker import`-ed as
#   IMAGE (default charrnn-cpu-base:bookworm-torch-cpu).
#
# The machine's CA bundle (which may hold a TLS-intercepting proxy's CA that pip needs to reach
# PyPI) is copied into the chroot only while pip runs there and deleted before the import: the
# base image carries Debian's stock ca-certificates, nothing of this machine's.
#
# usage: scripts/make_cpu_base.sh [--force] [IMAGE]      (as root: debootstrap and chroot)
# env:   TORCH_WHEEL   CPU torch wheel for cp311 (default: newest /opt/wheels/torch-*+cpu-cp311-*.whl;
#                      with none, torch>=2.6,<2.14 from TORCH_INDEX_URL, PyTorch's CPU index)
#        DEBIAN_MIRROR (default http://deb.debian.org/debian)
#        HOST_CA       CA bundle pip trusts inside the chroot (default /etc/ssl/certs/ca-certificates.crt)
# exit:  0 made (or already there), 3 a prerequisite is missing (one line on stderr), other: failed
set -euo pipefail

force=0
if [[ "${1:-}" == "--force" ]]; then
    force=1
    shift
fi
IMAGE="${1:-charrnn-cpu-base:bookworm-torch-cpu}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"

if [[ $force -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "make_cpu_base: $IMAGE already exists (use --force to remake it)"
    exit 0
fi

wheel="${TORCH_WHEEL:-}"
if [[ -z "$wheel" ]]; then
    wheel="$(find /opt/wheels -maxdepth 1 -name 'torch-*+cpu-cp311-*.whl' 2>/dev/null | sort -V | tail -n 1)"
fi
if [[ -n "$wheel" && ! -f "$wheel" ]]; then
    echo "make_cpu_base: TORCH_WHEEL $wheel does not exist" >&2
    exit 3
fi
if ! command -v debootstrap >/dev/null; then
    echo "make_cpu_base: debootstrap is not installed" >&2
    exit 3
fi

work="$(mktemp -d /tmp/charrnn-base.XXXXXX)"
root="$work/root"
cleanup() {
    if mountpoint -q "$root/proc" 2>/dev/null; then umount "$root/proc" || true; fi
    # --one-file-system: never reach through a mount that failed to come off.
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "make_cpu_base: debootstrap bookworm into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
}

if [[ -n "$wheel" ]]; then
    cp "$wheel" "$root/tmp/"
    torch_req="/tmp/$(basename "$wheel")"
    index=()
else # elsewhere: the CPU build from PyTorch's own index
    torch_req="torch>=2.6,<2.14"
    index=(--index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
        --extra-index-url https://pypi.org/simple)
fi
echo "make_cpu_base: installing ${torch_req#/tmp/} into /opt/venv"
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$HOST_CA" "$root/tmp/host-ca.pem"
chroot "$root" /usr/bin/python3 -m venv /opt/venv
chroot "$root" env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root \
    /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
    --cert /tmp/host-ca.pem "${index[@]}" "$torch_req"
chroot "$root" /opt/venv/bin/python -W ignore -c 'import torch; print("make_cpu_base: torch", torch.__version__)'
umount "$root/proc"

# Nothing of this machine's stays: its CA, the wheel, DNS settings; plus caches and docs.
rm -f "$root/tmp/host-ca.pem" "$root"/tmp/*.whl
: >"$root/etc/resolv.conf"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/root/.cache \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*

echo "make_cpu_base: importing as $IMAGE"
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    - "$IMAGE" >/dev/null
echo "make_cpu_base: made $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec))"
