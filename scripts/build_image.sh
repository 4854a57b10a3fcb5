#!/usr/bin/env bash
# Build deploy/Dockerfile with podman on a machine that cannot pull any image, then run it for real:
# a bundle as `semguard quickstart` writes it mounted at /bundle, the HEALTHCHECK and `semguard
# health`, one tritonclient request, SIGTERM -> exit 0, and an unreadable bundle -> one line.
#
#   bash scripts/build_image.sh            (root; needs podman, buildah, runc, mmdebstrap, and semguard
#                                           installed here for the bundle and the client)
#
# The base image is a Debian bookworm root filesystem made by mmdebstrap from this machine's apt
# sources and imported into podman (kept: later runs reuse it, and podman's layer cache keeps the
# torch layer). pip inside the build gets this machine's settings (scripts/image_pip_settings.py).
# Environment: SEMGUARD_IMAGE (tag, default semguard:0.1.0), SEMGUARD_IMAGE_WORK (work folder,
# default /var/tmp/semguard-image; the torch stage is kept as <tag name>-torch:cache), SEMGUARD_IMAGE_BUNDLE (serve this bundle instead of a quickstart's),
# SEMGUARD_BASE_IMAGE (default localhost/semguard-base:bookworm; deleted -> rebuilt).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${SEMGUARD_IMAGE:-semguard:0.1.0}
WORK=${SEMGUARD_IMAGE_WORK:-/var/tmp/semguard-image}
BASE=${SEMGUARD_BASE_IMAGE:-localhost/semguard-base:bookworm}
NAME=semguard-image-check-$$
mkdir -p "$WORK"
for tool in podman mmdebstrap runc; do
    command -v "$tool" >/dev/null || { echo "build_image.sh: $tool is not installed (apt-get install podman buildah runc mmdebstrap)" >&2; exit 2; }
done
say() { printf 'build_image.sh: %s\n' "$*"; }
elapsed() { local s=$(( $(date +%s) - $1 )); printf '%d min %02d s' $((s / 60)) $((s % 60)); }

# runc, not crun (crun cannot raise the open-file limit here); cgroupfs (no systemd); limits this
# machine's hard limits allow; events in a file (no journald).
export CONTAINERS_CONF="$WORK/containers.conf"
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

if ! podman image exists "$BASE"; then
    start=$(date +%s)
    sources=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [ -s "$f" ] && sources+=("$f")
    done
    # Check-Valid-Until off: a snapshot mirror's Release files are past their date by design.
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$WORK/base.tar" "${sources[@]}"
    podman import --quiet "$WORK/base.tar" "$BASE" >/dev/null
    rm -f "$WORK/base.tar"
    say "base image $BASE made by mmdebstrap in $(elapsed "$start")"
fi

pytag=$(podman run --rm "$BASE" python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
mapfile -t pip_args < <(python3 scripts/image_pip_settings.py "$WORK" "$pytag")
say "pip settings for the build: ${pip_args[*]:-none}"
start=$(date +%s)
build() {
    # docker format: the OCI format drops HEALTHCHECK. --network host: pip reaches this machine's index.
    podman build --format docker --network host --ignorefile deploy/Dockerfile.dockerignore \
        -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE" "${pip_args[@]}" "$@" .
}
# The torch stage tagged first: the prune below then keeps it, and the next build starts from it.
build --target torch -t "${TAG%%:*}-torch:cache"
build -t "$TAG"
build_time=$(elapsed "$start")
size=$(podman image inspect -f '{{.Size}}' "$TAG")
say "image $TAG: $(numfmt --to=si --round=nearest --format=%.2f "$size")B, built in $build_time"
podman image prune -f >/dev/null   # the dangling images an earlier build of the same tag left

bundle=${SEMGUARD_IMAGE_BUNDLE:-}
if [ -z "$bundle" ]; then
    # its world cache in the work folder: a later run (CI, a fresh clone) reuses it
    semguard quickstart --out "$WORK/quickstart" --world-cache "$WORK/world" >/dev/null
    bundle="$WORK/quickstart/bundle"
fi
bundle=$(realpath "$bundle")
[ -f "$bundle/bundle.json" ] || { echo "build_image.sh: $bundle is not a guard bundle (no bundle.json)" >&2; exit 2; }
ls -l "$bundle"   # the modes as written: the container's uid 10001 reads them through the mount

cleanup() { podman rm --force --ignore --time 0 "$NAME" "$NAME-unreadable" >/dev/null 2>&1 || true; }
trap cleanup EXIT
quiet_systemd() { grep -v 'systemd connection' >&2 || true; }   # no systemd here: its healthcheck timers cannot be made
podman run -d --name "$NAME" -p 127.0.0.1::8001 -p 127.0.0.1::8002 -v "$bundle:/bundle:ro" "$TAG" \
    >/dev/null 2> >(quiet_systemd)
grpc=$(podman port "$NAME" 8001/tcp | head -n1)
metrics=$(podman port "$NAME" 8002/tcp | head -n1)
healthy=
for _ in $(seq 90); do   # no systemd timer here: the HEALTHCHECK is run by hand
    if podman healthcheck run "$NAME" >/dev/null 2>&1; then healthy=1; break; fi
    [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 2
done
[ -n "$healthy" ] || { podman logs "$NAME"; echo "build_image.sh: the container never became healthy" >&2; exit 1; }
say "healthcheck: healthy"
semguard health --address "$grpc"
python3 - "$grpc" "$bundle" <<'EOF'
import json, sys
import numpy as np
import tritonclient.grpc as triton

address, bundle = sys.argv[1:]
manifest = json.load(open(f"{bundle}/bundle.json"))
images = np.random.default_rng(0).random((2, *manifest["input_shape"]), dtype=np.float32)
request = triton.InferInput("IMAGES", list(images.shape), "FP32")
request.set_data_from_numpy(images)
reply = triton.InferenceServerClient(address).infer(manifest["model_name"], [request])
assert reply.as_numpy("FLAG").shape == (2,) and np.isfinite(reply.as_numpy("SCORE")).all()
print(f"tritonclient: {manifest['model_name']} LABEL {reply.as_numpy('LABEL').tolist()} SCORE {reply.as_numpy('SCORE').round(3).tolist()}")
EOF
python3 -c 'import sys, urllib.request; text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode(); assert "semguard_requests_total" in text' "$metrics"
say "metrics: /metrics answers"
podman stop -t 60 "$NAME" >/dev/null 2> >(quiet_systemd)   # STOPSIGNAL SIGTERM: drain, then exit
code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
podman logs "$NAME" 2>&1 | tail -n 3
[ "$code" = 0 ] || { echo "build_image.sh: exit code $code after SIGTERM, not 0" >&2; exit 1; }
say "SIGTERM: drained, exit 0"

# The same bundle with its weights 0600 (root's, as safetensors used to write them): one line, exit 2.
unreadable="$WORK/unreadable-bundle"
rm -rf "$unreadable" && cp -a "$bundle" "$unreadable" && chmod 0600 "$unreadable/model.safetensors"
set +e
podman run --no-healthcheck --name "$NAME-unreadable" -v "$unreadable:/bundle:ro" "$TAG" >"$WORK/unreadable.out" 2>&1
code=$?
set -e
cat "$WORK/unreadable.out"
grep -q "^semguard serve: --bundle /bundle: /bundle/model.safetensors: not readable by semguard (uid 10001): mode 0600" "$WORK/unreadable.out" \
    && [ "$code" = 2 ] && [ "$(wc -l < "$WORK/unreadable.out")" = 1 ] \
    || { echo "build_image.sh: an unreadable bundle did not stop the server in one line (exit $code)" >&2; exit 1; }
say "unreadable bundle: one line, exit 2"
say "image $TAG: $(numfmt --to=si --round=nearest --format=%.2f "$size")B, built in $build_time; served, healthy, drained"
