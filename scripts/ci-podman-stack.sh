#!/usr/bin/env bash
# One CI step: docker-compose.yml built and started for real, with podman (no Docker engine runs
# here) and podman-compose, then torn down. Steps, each timed:
#   1. base image   a Debian root from the apt mirror (debootstrap), `podman import`ed; no registry
#                   can be reached, so this stands in for python:3.11-slim (Dockerfile BASE_IMAGE)
#   2. postgres     Debian's PostgreSQL on that root (tests/support/podman/Containerfile.postgres),
#                   standing in for postgres:16 through tests/support/podman/compose.podman-ci.yml
#   3. hpo image    the real Dockerfile; pip reads this machine's package sources (bind-mounted
#                   into the build) and, when a local CPU torch wheel exists, installs it instead of
#                   the multi-GB CUDA build: the only difference from a user's image
#   4. stack        podman-compose creates the containers from the real docker-compose.yml; they
#                   are started in depends_on order (podman-compose 1.0 ignores the conditions):
#                   postgres until its healthcheck passes, create-study to exit 0, then the
#                   dashboard and one worker (no GPU here: --gpus all finds none and runs on CPU)
#   5. study        the worker exits when the study is done; every trial must be finished in the
#                   containers' PostgreSQL, none failed, at least one COMPLETE
#   6. dashboard    answers HTTP on its published port and lists the study
# The images stay in podman's storage, so a second run on the same machine rebuilds nothing (the
# hpo layers after the dependencies when hpo's code changed); a missing image is rebuilt from
# scratch. Everything it started is removed on exit, also on failure or timeout.
#
# Needs root, podman, runc, podman-compose, debootstrap (scripts/ci-podman.sh installs them).
# Environment: HPO_PODMAN_BUDGET (seconds for the whole step, default 1200), HPO_PODMAN_N_TRIALS
# (run a shorter copy of the quickstart study), HPO_PODMAN_PORT (dashboard port, default 18080),
# HPO_PODMAN_REBUILD=1 (remove the cached images first: a cold run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SUPPORT=$ROOT/tests/support/podman
BUDGET=${HPO_PODMAN_BUDGET:-1200}
PORT=${HPO_PODMAN_PORT:-18080}
PROJECT=hpo-ci
BASE_IMAGE=localhost/hpo-ci/debian:bookworm
PG_IMAGE=localhost/hpo-ci/postgres:15
HPO_IMAGE=localhost/hpo-ci/hpo:latest
START=$SECONDS
STEP_TIMES=()

fail() { echo "ci-podman-stack: FAIL: $*" >&2; exit 1; }
remaining() { echo $((BUDGET - (SECONDS - START))); }
# step NAME COMMAND...: runs it within what is left of the budget and records its time.
step() {
    local name=$1 t0=$SECONDS left
    shift
    left=$(remaining)
    ((left > 0)) || fail "time budget of ${BUDGET}s spent before step '$name'"
    echo "== $name (budget left ${left}s)"
    "$@" || fail "step '$name' failed (or ran out of the ${BUDGET}s budget)"
    STEP_TIMES+=("$(printf '%-10s %4ds' "$name" $((SECONDS - t0)))")
}
report_times() {
    echo "== step times"
    printf '   %s\n' "${STEP_TIMES[@]}"
    echo "   total      $((SECONDS - START))s of ${BUDGET}s"
}

[ "$(id -u)" = 0 ] || fail "needs root (rootful podman; CI runs as root)"
for tool in podman runc podman-compose debootstrap; do
    command -v "$tool" >/dev/null || fail "$tool not installed (run scripts/ci-podman.sh as root)"
done

WORK=$(mktemp -d /tmp/hpo-podman-stack.XXXXXX)
# crun fails on these machines' hybrid cgroups; the default ulimits (nofile) exceed the sandbox's.
# A private containers.conf keeps the machine's own configuration untouched.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
PROJECT_DIR=$WORK/project
compose() { (cd "$PROJECT_DIR" && podman-compose -p "$PROJECT" -f docker-compose.yml -f compose.podman-ci.yml "$@"); }

cleanup() {
    local rc=$?
    trap - EXIT
    if [ -d "$PROJECT_DIR" ]; then
        if ((rc != 0)); then
            echo "== logs of the stack's containers (failure)"
            for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
                echo "--- $c: $(podman inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$c")"
                podman logs --tail 40 "$c" 2>&1 || true
            done
        fi
        local t0=$SECONDS
        compose down -v -t 5 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log"
        podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
        STEP_TIMES+=("$(printf '%-10s %4ds' teardown $((SECONDS - t0)))")
    fi
    report_times
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Leftovers of an interrupted run would clash with this one's names.
podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null
podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null
podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
if [ "${HPO_PODMAN_REBUILD:-0}" = 1 ]; then
    podman rmi -f "$HPO_IMAGE" "$PG_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
    podman image prune -f >/dev/null
fi

# --- 1. base image -------------------------------------------------------------------------------
debian_mirror() {
    # The Debian mirror apt uses here (deb822 "URIs:" or one-line "deb URL suite"): a URL ending in
    # /debian, so neither the security archive nor a third-party repository.
    grep -rhoE '^(URIs:[[:space:]]*|deb[[:space:]]+)(\[[^]]*\][[:space:]]+)?[a-z]+://[^[:space:]]+' \
        /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null |
        grep -oE '[a-z]+://[^[:space:]]+' | grep -E '/debian/?$' | head -n 1 || true
}
build_base() {
    if podman image exists "$BASE_IMAGE"; then
        echo "cached: $BASE_IMAGE"
        return 0
    fi
    local mirror suite
    mirror=${HPO_CI_DEBIAN_MIRROR:-$(debian_mirror)}
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    [ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt/sources.list*"; return 1; }
    echo "debootstrap $suite from $mirror"
    # python3-dev and gcc: hpbandster's netifaces is compiled from source (see the Dockerfile).
    timeout "$(remaining)" debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates \
        "$suite" "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log"; return 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
}
step base build_base

# --- 2. PostgreSQL image ---------------------------------------------------------------------------
build_postgres() {
    timeout "$(remaining)" podman build -q --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --label hpo-ci=1 -f "$SUPPORT/Containerfile.postgres" -t "$PG_IMAGE" "$SUPPORT" >/dev/null
}
step postgres build_postgres

# --- 3. hpo image ----------------------------------------------------------------------------------
build_hpo() {
    # The build's pip uses the package sources this machine's pip uses: its configuration (`pip
    # config list`, written out as one pip.conf) and the local folders it names, bind-mounted
    # read-only into the RUN steps (nothing is copied into the image). Elsewhere there is none of
    # this and pip reads PyPI as in a user's build.
    local mounts=() dir cpu_torch
    mkdir -p "$WORK/pip"
    python3 - "$WORK/pip" >"$WORK/pip/mounts" <<'PY' || return 1
import re, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1])
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=False).stdout
values = {}
for scope in ("global.", ":env:."):  # the environment overrides the files, as in pip
    for key, value in re.findall(r"^" + re.escape(scope) + r"([\w-]+)='(.*)'$", listing, re.M):
        values[key] = value
constraints = ""
if "constraint" in values and Path(values["constraint"]).is_file():
    constraints = Path(values["constraint"]).read_text()
(out / "constraints.txt").write_text(constraints)
values["constraint"] = "/etc/xdg/pip/constraints.txt"
values.pop("cert", None)  # the container's bundle is this machine's (mounted below)
(out / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
mounts = set()
for key in ("find-links", "index-url", "extra-index-url"):
    for token in values.get(key, "").split():
        path = token[len("file://"):] if token.startswith("file://") else token
        if path.startswith("/") and Path(path).exists():
            # a file:// index's pages link to ../files: mount the folder above "simple"
            mounts.add(str(Path(path).parent) if Path(path).name == "simple" else path)
print("\n".join(sorted(mounts)))
PY
    while read -r dir; do
        [ -n "$dir" ] && mounts+=(--volume "$dir:$dir:ro")
    done <"$WORK/pip/mounts"
    mounts+=(--volume "$WORK/pip:/etc/xdg/pip:ro")
    # This machine's trust roots: its HTTPS traffic may pass a proxy with a CA of its own.
    [ -f /etc/ssl/certs/ca-certificates.crt ] &&
        mounts+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    # A CPU torch wheel on disk (a few hundred MB) instead of the CUDA one (GBs with its nvidia-*
    # wheels): this step's worker has no GPU either way.
    cpu_torch=$(find $(cat "$WORK/pip/mounts") -maxdepth 2 -name 'torch-*+cpu-cp311-*.whl' 2>/dev/null |
        sort -V | tail -n 1)
    # The project's tested versions (constraints.txt), less the CUDA build of torch when the CPU
    # wheel replaces it (its torchvision and CUDA libraries follow from it).
    cp "$ROOT/constraints.txt" "$WORK/pip/project-constraints.txt"
    if [ -n "$cpu_torch" ]; then
        echo "torch==$(basename "$cpu_torch" | cut -d- -f2)" >>"$WORK/pip/constraints.txt"
        grep -v -i -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' "$ROOT/constraints.txt" \
            >"$WORK/pip/project-constraints.txt"
    fi
    echo "pip sources: $(tr '\n' ' ' <"$WORK/pip/mounts")+ PyPI; constraints:" \
        "$(grep -v '^#' "$WORK/pip/constraints.txt" | tr '\n' ' ')"
    timeout "$(remaining)" podman build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --build-arg CONSTRAINTS=/etc/xdg/pip/project-constraints.txt \
        --label hpo-ci=1 "${mounts[@]}" -t "$HPO_IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 ||
        { tail -n 40 "$WORK/build.log"; return 1; }
    # The images this script built before and no longer names (only the changed top layers).
    podman image prune -f --filter label=hpo-ci=1 >/dev/null
    grep -E '^(STEP|--> Using cache)' "$WORK/build.log" | sed 's/^/   /' | cut -c1-110 || true
}
step hpo-image build_hpo

# --- 4. the stack ----------------------------------------------------------------------------------
# A copy of the project's compose inputs, so that a developer's own .env (podman-compose reads the
# compose file's folder's .env over the environment) never leaks into the check.
mkdir -p "$PROJECT_DIR/data"
cp "$ROOT/docker-compose.yml" "$SUPPORT/compose.podman-ci.yml" "$PROJECT_DIR/"
cp -r "$ROOT/studies" "$ROOT/search_spaces" "$PROJECT_DIR/"
STUDY=digits_quickstart
STUDY_FILE=studies/digits_quickstart.yaml
if [ -n "${HPO_PODMAN_N_TRIALS:-}" ]; then
    # A shorter copy of the quickstart (same objective, space, sampler and pruner).
    STUDY=digits_ci
    STUDY_FILE=studies/digits_ci.yaml
    sed -e "s/^name: .*/name: $STUDY/" -e "s/^n_trials: .*/n_trials: $HPO_PODMAN_N_TRIALS/" \
        "$PROJECT_DIR/studies/digits_quickstart.yaml" >"$PROJECT_DIR/$STUDY_FILE"
fi
N_TRIALS=$(sed -n 's/^n_trials: *//p' "$PROJECT_DIR/$STUDY_FILE")
PG_PASSWORD=ci-$RANDOM$RANDOM
cat >"$PROJECT_DIR/.env" <<EOF
POSTGRES_USER=hpo
POSTGRES_PASSWORD=$PG_PASSWORD
POSTGRES_DB=hpo
HPO_STUDY_FILE=$STUDY_FILE
HPO_STUDY=$STUDY
HPO_DASHBOARD_BIND=127.0.0.1
HPO_DASHBOARD_PORT=$PORT
HPO_DATA_DIR=./data
EOF
ctr() { echo "${PROJECT}_$1_1"; }
psql_q() { podman exec "$(ctr postgres)" psql -U hpo -d hpo -tAc "$1"; }

start_stack() {
    compose up --no-build --no-start >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; return 1; }
    podman start "$(ctr postgres)" >/dev/null
    # podman runs healthchecks from systemd timers, absent here: run the file's check by hand.
    local deadline=$((SECONDS + 60))
    until podman healthcheck run "$(ctr postgres)" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { echo "postgres not healthy after 60s"; return 1; }
        sleep 1
    done
    echo "postgres healthy"
    timeout "$(remaining)" podman start -a "$(ctr create-study)"
    local code
    code=$(podman inspect -f '{{.State.ExitCode}}' "$(ctr create-study)")
    [ "$code" = 0 ] || { echo "create-study exited $code"; return 1; }
    podman start "$(ctr dashboard)" "$(ctr worker)" >/dev/null
}
step stack start_stack

# --- 5. the study through the containers ---------------------------------------------------------
run_study() {
    local status code
    while :; do
        status=$(podman inspect -f '{{.State.Status}}' "$(ctr worker)")
        [ "$status" = exited ] && break
        (($(remaining) > 0)) || { echo "worker still running at the end of the budget"; return 1; }
        sleep 3
    done
    code=$(podman inspect -f '{{.State.ExitCode}}' "$(ctr worker)")
    podman logs --tail 8 "$(ctr worker)" 2>&1 | sed 's/^/   worker| /'
    [ "$code" = 0 ] || { echo "worker exited $code"; return 1; }
    local counts total finished complete
    counts=$(psql_q "SELECT t.state, count(*) FROM trials t JOIN studies s USING (study_id)
                     WHERE s.study_name = '$STUDY' GROUP BY t.state ORDER BY 1")
    echo "trials in the containers' PostgreSQL: $(echo "$counts" | tr '\n' ' ')"
    total=$(echo "$counts" | awk -F'|' '{n += $2} END {print n + 0}')
    finished=$(echo "$counts" | awk -F'|' '$1 == "COMPLETE" || $1 == "PRUNED" {n += $2} END {print n + 0}')
    complete=$(echo "$counts" | awk -F'|' '$1 == "COMPLETE" {n += $2} END {print n + 0}')
    [ "$total" = "$N_TRIALS" ] && [ "$finished" = "$N_TRIALS" ] && ((complete >= 1)) || {
        echo "expected $N_TRIALS trials, all COMPLETE or PRUNED and at least one COMPLETE"
        return 1
    }
    echo "best $(psql_q "SELECT min(v.value) FROM trial_values v JOIN trials t USING (trial_id)
                         JOIN studies s USING (study_id)
                         WHERE s.study_name = '$STUDY' AND t.state = 'COMPLETE'") (val_loss)"
}
step study run_study

# --- 6. the dashboard ------------------------------------------------------------------------------
check_dashboard() {
    local deadline=$((SECONDS + 60)) body
    until body=$(curl -fsS --max-time 5 "http://127.0.0.1:$PORT/api/studies"); do
        ((SECONDS < deadline)) || { echo "dashboard not answering on 127.0.0.1:$PORT"; return 1; }
        sleep 1
    done
    grep -q "\"$STUDY\"" <<<"$body" || { echo "dashboard's /api/studies lacks $STUDY: ${body:0:300}"; return 1; }
    curl -fsS --max-time 5 -o /dev/null -w 'GET /dashboard: HTTP %{http_code}\n' "http://127.0.0.1:$PORT/dashboard"
}
step dashboard check_dashboard

echo "ci-podman-stack: OK: $STUDY finished ($N_TRIALS trials) through the containers; dashboard answered"
