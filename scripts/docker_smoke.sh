#!/usr/bin/env bash
# Docker smoke test, run by .ci/run (and `make docker-smoke`):
#
#   1. lint: hadolint + `docker-compose config -q` (scripts/docker_lint.sh), always;
#   2. a Docker engine: the running one, else `dockerd --iptables=false --bridge=none` started
#      here (and stopped at the end); where none can start, one line says so and it exits 0;
#   3. a CPU base image made locally (scripts/make_cpu_base.sh: no image registry is reachable
#      here), passed as BASE_IMAGE;
#   4. the image built from a clean copy of the repository (what git tracks, plus untracked
#      files that are not ignored) with the legacy builder and the host network for PyPI;
#   5. the api service of docker-compose.cpu.yml started on a free port; waits for /ready, streams
#      100 characters over SSE (start, token x100, done), checks the container runs as non-root,
#      the healthcheck turns healthy, and the machine's CA bundle is nowhere in the image;
#   6. many replicas: docker-compose.lb.yml with 2 replicas behind nginx (Debian's nginx built on
#      the same base, deploy/nginx/Dockerfile: the official image cannot be pulled here), checked
#      by scripts/lb_smoke.py: 40 concurrent streams spread over both replicas, unbuffered; one
#      replica stopped mid-load drains without cutting a stream; later requests all succeed;
#   7. `docker-compose down`, the temporary context removed, superseded images removed.
#
# The build reaches PyPI through this machine's TLS-intercepting network, so pip must trust the
# machine's CA bundle. Without BuildKit there is no `--secret`, so the bundle goes in the build
# context as docker-build-ca.pem, which only the Dockerfile's builder stage reads; the runtime
# stage copies just the finished venv out of it. Step 5 proves no copy of the bundle is left in
# the final image. The tagged base, builder and final images stay as the build cache, so a
# second run takes well under a minute.
#
# env: SMOKE_CA_BUNDLE  CA bundle for the build (default /etc/ssl/certs/ca-certificates.crt)
#      SMOKE_BASE_IMAGE base image to build on (default: made by scripts/make_cpu_base.sh)
#      SMOKE_KEEP=1     leave the service running and the context in place, for debugging
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
T0=$(date +%s)

BASE_IMAGE="${SMOKE_BASE_IMAGE:-charrnn-cpu-base:bookworm-torch-cpu}"
IMAGE="charrnn:smoke"
BUILDER_IMAGE="charrnn-smoke:builder"
NGINX_IMAGE="charrnn-nginx:smoke"
PROJECT="charrnn-smoke"
LB_PROJECT="charrnn-smoke-lb"
LB_GRACE_S=5 # CHARRNN_SHUTDOWN_GRACE_S of the replicas here (default 10): a shorter stop test
CA_BUNDLE="${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

log() { echo "docker_smoke: $*"; }
elapsed() { echo "$(($(date +%s) - T0))s"; }
skip() {
    echo "docker_smoke: skipped, $* (lint ran; $(elapsed))"
    exit 0
}
fail() {
    echo "docker_smoke: FAILED: $* ($(elapsed))" >&2
    exit 1
}

# ------------------------------------------------------------------------------------ lint --
bash scripts/docker_lint.sh

# ----------------------------------------------------------------------------------- tools --
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
[[ -n "${SMOKE_BASE_IMAGE:-}" ]] || command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        skip "no Docker tools (${missing[*]}) and no root apt-get to install them"
    fi
    log "installing ${missing[*]} with apt-get"
    if ! { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
            --no-install-recommends "${missing[@]}"; } >/tmp/docker_smoke.apt.log 2>&1; then
        skip "could not install ${missing[*]} (see /tmp/docker_smoke.apt.log)"
    fi
fi

# ---------------------------------------------------------------------------------- engine --
work="$(mktemp -d /tmp/charrnn-smoke.XXXXXX)"
ctx="$work/context"
compose=(docker-compose -p "$PROJECT" -f "$ctx/docker-compose.cpu.yml")
lb_compose=(docker-compose -p "$LB_PROJECT" -f "$ctx/docker-compose.lb.yml")
started_dockerd=""

cleanup() {
    local rc=$?
    set +e
    if [[ "${SMOKE_KEEP:-0}" == 1 && $rc -ne 0 ]]; then
        log "SMOKE_KEEP=1: left running; context in $ctx"
        return
    fi
    if [[ -f "$ctx/docker-compose.cpu.yml" ]] && docker info >/dev/null 2>&1; then
        "${compose[@]}" down --remove-orphans --volumes --timeout 20 >/dev/null 2>&1
        "${lb_compose[@]}" down --remove-orphans --volumes --timeout 20 >/dev/null 2>&1
    fi
    if [[ -n "$started_dockerd" ]]; then
        kill "$started_dockerd" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
    dockerd --iptables=false --bridge=none >"$work/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$started_dockerd" 2>/dev/null || break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        reason="$(grep -m1 -iE 'level=(fatal|error)' "$work/dockerd.log" | sed 's/.*msg="\([^"]*\)".*/\1/' || true)"
        skip "no Docker engine could start here${reason:+: $reason}"
    fi
    log "started dockerd --iptables=false --bridge=none (pid $started_dockerd)"
fi
log "engine: Docker $(docker version -f '{{.Server.Version}}' 2>/dev/null)"

# ------------------------------------------------------------------------------------ base --
if [[ -z "${SMOKE_BASE_IMAGE:-}" ]]; then
    rc=0
    timeout 600 bash scripts/make_cpu_base.sh "$BASE_IMAGE" || rc=$?
    [[ $rc -eq 3 ]] && skip "no CPU base image could be made (see above)"
    [[ $rc -eq 0 ]] || fail "scripts/make_cpu_base.sh exited $rc"
fi
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || fail "base image $BASE_IMAGE is missing"

# --------------------------------------------------------------------------------- context --
mkdir -p "$ctx"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        (cd "$REPO" && { xargs -0 -r cp --parents -P -t "$ctx" 2>/dev/null || true; })
else
    tar -C "$REPO" --exclude=.git --exclude=.venv -cf - . | tar -C "$ctx" -xf -
fi
[[ -f "$ctx/Dockerfile" ]] || fail "no Dockerfile in the build context"
mkdir -p "$ctx/models"
if ! compgen -G "$ctx/models/*.pt" >/dev/null; then
    # The image serves what the repository ships; before a model is committed, stand in a tiny one.
    [[ -x "$REPO/.venv/bin/python" ]] || fail "models/ has no checkpoint and there is no .venv to make one"
    corpus="$work/corpus.txt"
    python3 - "$corpus" "$REPO"/charrnn/*.py <<'EOF'
import sys
text = "".join(open(p, encoding="utf-8").read() for p in sys.argv[2:])
open(sys.argv[1], "w", encoding="utf-8").write((text * 40)[:40000])
EOF
    log "models/ has no checkpoint: training a tiny stand-in models/alice.pt"
    "$REPO/.venv/bin/python" -m training fit --data "$corpus" --out "$ctx/models/alice.pt" \
        --hidden 32 --embed 8 --batch-size 8 --seq-len 25 --epochs 1 --threads 1 --quiet >/dev/null
    rm -f "$ctx"/models/*.last.pt
fi
# The compose file mounts ./models (this copy) over /app/models for the non-root service user.
chmod -R a+rX "$ctx/models"
cp "$CA_BUNDLE" "$ctx/docker-build-ca.pem"

# ----------------------------------------------------------------------------------- build --
dangling_before="$(docker images -q --filter dangling=true | sort)"
build() {
    timeout 900 docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" "$@" "$ctx" \
        >>"$work/build.log" 2>&1 || {
        tail -n 40 "$work/build.log" >&2
        fail "docker build $*"
    }
}
log "building $IMAGE on $BASE_IMAGE"
# The builder stage is tagged too, so it stays as the cache and never turns into a dangling image.
build --target builder -t "$BUILDER_IMAGE"
build -t "$IMAGE"
# Older builds that this one superseded (now untagged) go; the tagged images are the cache.
superseded="$(comm -13 <(echo "$dangling_before") <(docker images -q --filter dangling=true | sort))"
# shellcheck disable=SC2086 # one id per word
[[ -z "$superseded" ]] || docker rmi $superseded >/dev/null 2>&1 || true
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec), $(elapsed))"

docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE" | grep -q '/health' ||
    fail "the image has no HEALTHCHECK against /health"
if docker history --no-trunc "$IMAGE" | grep -q 'build-ca'; then
    fail "the image history mentions the build CA"
fi
# The certificates that the handed-in bundle adds to the base's own (this machine's CAs) must be
# in no file of the final image. Files over 8 MB are skipped: a PEM bundle is never that big.
base_bundle="$(docker run --rm --network none "$BASE_IMAGE" cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true)"
needles="$(python3 - "$CA_BUNDLE" <(printf '%s\n' "$base_bundle") <<'EOF'
import re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
def bodies(path):
    return {"".join(m.split()) for m in pem.findall(open(path, encoding="ascii", errors="replace").read())}
extra = bodies(sys.argv[1]) - bodies(sys.argv[2])
# A 64-character line from the middle of each extra certificate, as it appears in a PEM file.
print(" ".join(b[(len(b) // 2) // 64 * 64:][:64] for b in sorted(extra)))
EOF
)"
if [[ -z "$needles" ]]; then
    log "the build CA adds no certificate to the base's; nothing of it to look for"
else
    # shellcheck disable=SC2086 # one needle per word
    docker run --rm -i --network none --user 0 "$IMAGE" python - $needles <<'EOF' ||
import os, sys
needles = [n.encode() for n in sys.argv[1:]]
for root, dirs, files in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files:
        path = os.path.join(root, name)
        try:
            if os.path.islink(path) or not 0 < os.path.getsize(path) <= 8 << 20:
                continue
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if any(n in data for n in needles):
            sys.exit(f"a certificate of the build CA bundle is in the image at {path}")
EOF
        fail "the build CA was left in the image"
    log "none of the $(wc -w <<<"$needles") certificate(s) the build CA adds is in the image"
fi

# ------------------------------------------------------------------------------------- run --
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export CHARRNN_IMAGE="$IMAGE" BASE_IMAGE CHARRNN_PUBLISH="$port" CHARRNN_THREADS=1
"${compose[@]}" down --remove-orphans --volumes --timeout 5 >/dev/null 2>&1 || true # an old run
"${compose[@]}" up -d --no-build api >"$work/up.log" 2>&1 || {
    cat "$work/up.log" >&2
    fail "docker-compose up"
}
cid="$("${compose[@]}" ps -q api)"
log "api up as container ${cid:0:12} on 127.0.0.1:$port"

python3 - "$port" <<'EOF' || { "${compose[@]}" logs --tail 40 api >&2; fail "the service check"; }
import json, sys, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=5) as r:
            if r.status == 200:
                break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass
    if time.monotonic() > deadline:
        sys.exit("/ready did not answer 200 within 180 s")
    time.sleep(1)

body = json.dumps({"prime": "Alice", "max_new_chars": 100, "seed": 1}).encode()
req = urllib.request.Request(
    base + "/generate/stream", data=body, method="POST",
    headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
)
events, event, data = [], None, []
with urllib.request.urlopen(req, timeout=60) as r:
    assert r.headers.get_content_type() == "text/event-stream", r.headers["Content-Type"]
    for raw in r:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line == "" and (event or data):
            events.append((event or "message", json.loads("\n".join(data))))
            event, data = None, []
kinds = [k for k, _ in events]
assert kinds == ["start"] + ["token"] * 100 + ["done"], kinds[:3] + ["..."] + kinds[-3:]
text = "".join(d["text"] for k, d in events if k == "token")
done = events[-1][1]
assert len(text) == 100 and done["generated_text"] == text, (len(text), done)
assert [d["index"] for k, d in events if k == "token"] == list(range(100))
print(f"docker_smoke: SSE ok: start, 100 tokens, done ({done['finish_reason']}): {text[:40]!r}...")
# The image ships the native int8 kernels prebuilt (Dockerfile): the step must run them, not a
# fallback.
with urllib.request.urlopen(base + "/info", timeout=10) as r:
    kernels = [m["decode_kernels"] for m in json.load(r)["models"]]
assert kernels == ["native"], f"the decode step runs {kernels}, not the native kernels"
print("docker_smoke: the decode step runs the native int8 kernels")
EOF

uid="$(docker exec "$cid" id -u)"
[[ "$uid" =~ ^[0-9]+$ && "$uid" -ne 0 ]] || fail "the service runs as uid '$uid', not non-root"
log "the service runs as uid $uid ($(docker exec "$cid" id -un 2>/dev/null || echo '?'))"

for _ in $(seq 1 60); do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$cid")"
    [[ "$health" == healthy || "$health" == unhealthy ]] && break
    sleep 1
done
[[ "$health" == healthy ]] || fail "container health is '$health'"
log "container is healthy"
# Its start-up line says how it decodes: int8 weights found exact by the self-test on this CPU
# (charrnn/quantization.py), batch-invariant; not an fp32 fallback.
decodes="$("${compose[@]}" logs api 2>&1 | grep -m1 "decodes with" || true)"
[[ "$decodes" == *"decodes with int8 weights"*"native kernels; batch-invariant"* ]] ||
    fail "the image does not decode exactly in int8 with the native kernels: '$decodes'"
log "start-up line: ${decodes##*: }"

"${compose[@]}" down --remove-orphans --volumes --timeout 20 >/dev/null 2>&1 || fail "docker-compose down"
[[ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ]] ||
    fail "containers left after docker-compose down"
log "one host: built, served, streamed, torn down ($(elapsed))"

# --------------------------------------------------------------------------- many replicas --
log "building $NGINX_IMAGE (Debian's nginx on $BASE_IMAGE)"
timeout 600 docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$NGINX_IMAGE" \
    "$ctx/deploy/nginx" >>"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2
    fail "docker build deploy/nginx"
}
lb_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export CHARRNN_NGINX_IMAGE="$NGINX_IMAGE" CHARRNN_PUBLISH="127.0.0.1:$lb_port" CHARRNN_REPLICAS=2 \
    CHARRNN_SHUTDOWN_GRACE_S="$LB_GRACE_S"
"${lb_compose[@]}" down --remove-orphans --volumes --timeout 5 >/dev/null 2>&1 || true # an old run
# nginx starts once both replicas are healthy (depends_on), and resolves `api` to both then.
timeout 300 "${lb_compose[@]}" up -d --no-build >"$work/up-lb.log" 2>&1 || {
    cat "$work/up-lb.log" >&2
    "${lb_compose[@]}" logs --tail 20 >&2 || true
    fail "docker-compose -f docker-compose.lb.yml up"
}
mapfile -t replicas < <("${lb_compose[@]}" ps -q api)
[[ ${#replicas[@]} -eq 2 ]] || fail "docker-compose.lb.yml started ${#replicas[@]} replicas, not 2"
log "2 replicas (${replicas[0]:0:12}, ${replicas[1]:0:12}) behind nginx on 127.0.0.1:$lb_port"
python3 scripts/lb_smoke.py --url "http://127.0.0.1:$lb_port" --grace "$LB_GRACE_S" \
    --replica "${replicas[0]}" --replica "${replicas[1]}" || {
    "${lb_compose[@]}" logs --tail 30 >&2 || true
    fail "the load-balancer check"
}
"${lb_compose[@]}" down --remove-orphans --volumes --timeout 20 >/dev/null 2>&1 ||
    fail "docker-compose -f docker-compose.lb.yml down"
[[ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$LB_PROJECT")" ]] ||
    fail "containers left after docker-compose -f docker-compose.lb.yml down"
log "ok: built, served, streamed, load-balanced, torn down in $(elapsed)"
