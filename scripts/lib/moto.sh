#!/usr/bin/env bash
# Helpers to install and run the moto AWS emulator (DynamoDB, SQS, EC2 on one loopback port).
# Source this file; it defines:
#   moto_ensure_installed  create the venv and install moto[server] + boto3 if needed
#   moto_start             start moto_server on a free 127.0.0.1 port, export AWS_* env vars,
#                          stop it again when the sourcing shell exits
#   moto_stop              stop it now (idempotent)
#   pp_on_exit CMD         register another command for EXIT (run in reverse order of registration;
#                          use it instead of your own `trap ... EXIT`, which would replace moto's)
# and exports POST_PROVISION_VENV and POST_PROVISION_PYTHON.

POST_PROVISION_VENV="${POST_PROVISION_VENV:-$HOME/.cache/post-provision/venv}"
POST_PROVISION_PYTHON="$POST_PROVISION_VENV/bin/python"
export POST_PROVISION_VENV POST_PROVISION_PYTHON

MOTO_VERSION_PIN="5.2.5"

_pp_log() { printf '[moto.sh] %s\n' "$*" >&2; }

# ---- EXIT handling: one trap, a list of commands run in reverse order of registration ----
_PP_EXIT_CMDS=()
_pp_run_exit_cmds() {
    local rc=$? i
    _PP_EXIT_RC=$rc
    for ((i = ${#_PP_EXIT_CMDS[@]} - 1; i >= 0; i--)); do
        eval "${_PP_EXIT_CMDS[i]}" || true
    done
    _PP_EXIT_CMDS=()
    return "$rc"
}
pp_on_exit() {
    _PP_EXIT_CMDS+=("$1")
    trap _pp_run_exit_cmds EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

_pp_create_venv() {
    local venv="$1" out
    mkdir -p "$(dirname "$venv")"
    if out="$(python3 -m venv "$venv" 2>&1)"; then
        return 0
    fi
    rm -rf "$venv"
    if grep -qiE 'ensurepip|python3[.0-9]*-venv' <<<"$out"; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            _pp_log "python3 -m venv failed (no ensurepip); installing python3-venv with apt-get"
            local pyver
            pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null ||
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${pyver}-venv" >/dev/null
            python3 -m venv "$venv"
            return $?
        fi
        _pp_log "ERROR: 'python3 -m venv' failed because ensurepip is missing."
        _pp_log "       Install the python3-venv package (as root: apt-get install python3-venv) and retry."
    fi
    printf '%s\n' "$out" >&2
    return 1
}

moto_ensure_installed() {
    local venv="$POST_PROVISION_VENV"
    if [ -x "$venv/bin/moto_server" ] && [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -c 'import boto3, moto, jsonschema' >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        _pp_log "ERROR: python3 not found; install Python 3.11+ first."
        return 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        _pp_log "creating virtualenv $venv"
        _pp_create_venv "$venv" || return 1
    fi
    _pp_log "installing moto[server]==$MOTO_VERSION_PIN and boto3 into $venv"
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
    local err
    err="$(mktemp)"
    if ! "${pip[@]}" install "moto[server]==$MOTO_VERSION_PIN" boto3 jsonschema 2>"$err"; then
        _pp_log "moto $MOTO_VERSION_PIN not installable ($(grep -m1 '^ERROR' "$err" | cut -c1-160)); trying the newest 5.2.x"
        if ! "${pip[@]}" install "moto[server]>=5.2,<5.3" boto3 jsonschema; then
            _pp_log "ERROR: could not install moto[server] into $venv; first attempt said:"
            tail -n 20 "$err" >&2
            rm -f "$err"
            return 1
        fi
    fi
    rm -f "$err"
    if [ ! -x "$venv/bin/moto_server" ]; then
        _pp_log "ERROR: moto_server missing from $venv/bin after install"
        return 1
    fi
}

_pp_free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

moto_stop() {
    if [ -n "${MOTO_PID:-}" ]; then
        if kill -0 "$MOTO_PID" 2>/dev/null; then
            kill "$MOTO_PID" 2>/dev/null || true
            local i
            for i in $(seq 1 50); do
                kill -0 "$MOTO_PID" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$MOTO_PID" 2>/dev/null || true
        fi
        wait "$MOTO_PID" 2>/dev/null || true
        MOTO_PID=""
    fi
}

# Returns 0 once moto answers HTTP on $1, 1 if the process died, 2 on timeout (~30 s).
_pp_wait_for_moto() {
    local port="$1" pid="$2" i code
    for i in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/moto-api/data.json" 2>/dev/null || true)"
        if [ -n "$code" ] && [ "$code" != "000" ]; then
            return 0
        fi
        sleep 0.2
    done
    return 2
}

moto_start() {
    local venv="$POST_PROVISION_VENV" attempt port pid log rc
    if [ ! -x "$venv/bin/moto_server" ]; then
        _pp_log "ERROR: $venv/bin/moto_server missing; call moto_ensure_installed first"
        return 1
    fi
    log="$(mktemp "${TMPDIR:-/tmp}/moto-server.XXXXXX.log")"
    MOTO_LOG="$log"
    for attempt in 1 2 3; do
        port="$(_pp_free_port)"
        "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 </dev/null &
        pid=$!
        MOTO_PID="$pid"
        if [ "$attempt" = 1 ]; then
            # Stop moto on exit; keep its log only when the script failed.
            pp_on_exit 'moto_stop; if [ "${_PP_EXIT_RC:-1}" = 0 ]; then rm -f "${MOTO_LOG:-}"; fi'
        fi
        rc=0
        _pp_wait_for_moto "$port" "$pid" || rc=$?
        if [ "$rc" = 0 ]; then
            break
        fi
        moto_stop
        if [ "$rc" = 2 ] || [ "$attempt" = 3 ]; then
            _pp_log "ERROR: moto_server did not come up on 127.0.0.1:$port; log tail ($log):"
            tail -n 30 "$log" >&2 || true
            return 1
        fi
        _pp_log "moto_server exited early (port race?), retrying"
    done
    export MOTO_PORT="$port" MOTO_PID="$pid" MOTO_LOG="$log"
    export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
    export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
    # Never let a developer's real session token / profile leak into emulator calls.
    unset AWS_SESSION_TOKEN AWS_PROFILE
    _pp_log "moto_server up at $AWS_ENDPOINT_URL (pid $pid, log $log)"
}
