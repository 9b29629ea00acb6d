#!/usr/bin/env bash
# Reproduces every figure of BENCHMARKS.md: builds release, runs the criterion benches of the
# pure core, counts allocations and instructions per admission, profiles the two servers with
# callgrind, runs the load benchmark (kips vs the TLS ceiling) and cold start, the relay
# bridge benchmark (kips bridge -L -> kips relay -> -T beside direct TCP), and prints the
# tables. Results also land in target/bench-results/<time>/.
#
#   scripts/bench.sh            full run (waits up to 30 min for a quiet machine), soak included
#   scripts/bench.sh --quick    short smoke run (not for publishing)
#   scripts/bench.sh --soak     the soak alone: 10 minutes at 5,000 req/s of mixed pods and
#                               workloads over HTTP/2, certificate files rotated every minute
#   BENCH_NO_WAIT=1 scripts/bench.sh   do not wait for a quiet machine
#
# Needs: cargo, python3, valgrind (callgrind), taskset (util-linux). 2+ cores: the servers
# run on core 0, every client and the criterion benches on core 1.
set -euo pipefail

cd "$(dirname "$0")/.."
QUICK=0
SOAK_ONLY=0
case "${1:-}" in
--quick) QUICK=1 ;;
--soak) SOAK_ONLY=1 ;;
"") ;;
*) echo "usage: scripts/bench.sh [--quick | --soak]" >&2; exit 2 ;;
esac
SERVER_CORE=0
CLIENT_CORE=1
OUT="target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

background_pids=()
cleanup() {
    for pid in "${background_pids[@]:-}"; do
        [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM
trap 'echo "bench.sh: failed at line $LINENO" >&2' ERR

section() { printf '\n## %s\n\n' "$1" | tee -a "$OUT/summary.md"; }

busy_processes() { # compilers and builds of any language
    ps -eo comm= | grep -xE 'cargo|rustc|go|compile|cc1|cc1plus|ld|link|javac|mvn' || true
}

wait_for_quiet() {
    [[ "${BENCH_NO_WAIT:-0}" == 1 || $QUICK == 1 ]] && return 0
    local waited=0
    while :; do
        local load
        load=$(cut -d' ' -f1 /proc/loadavg)
        if python3 -c "import sys; sys.exit(0 if float('$load') < 0.3 else 1)" && [[ -z "$(busy_processes)" ]]; then
            return 0
        fi
        if ((waited >= 1800)); then
            echo "WARNING: machine still busy after 30 min (load $load); measuring anyway" | tee -a "$OUT/summary.md"
            return 0
        fi
        ((waited % 60 == 0)) && echo "waiting for a quiet machine (load $load)..." >&2
        sleep 10
        waited=$((waited + 10))
    done
}

echo "# kips benchmarks ($(date -u +%FT%TZ))" | tee "$OUT/summary.md"
section "Machine"
{
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "- kernel: $(uname -r)"
    echo "- $(rustc --version)"
    echo "- memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
} | tee -a "$OUT/summary.md"

echo "building (release profile; bench targets and the kips binary)..." >&2
BENCHES=(--bench admission --bench admission_allocations --bench admission_profile --bench load --bench bridge)
cargo bench "${BENCHES[@]}" --no-run --quiet
bench_exe() { # the executable of bench target $1
    cargo bench --bench "$1" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
}
PROFILE_EXE=$(bench_exe admission_profile)
LOAD_EXE=$(bench_exe load)
KIPS_EXE=target/release/kips

# --- soak: kips webhook for minutes at a fixed rate, certificates rotating -------------------
soak() {
    wait_for_quiet
    local soak_args=(--bench --soak --server-core "$SERVER_CORE" --client-core "$CLIENT_CORE")
    ((QUICK)) && soak_args+=(--soak-duration 20 --rotate-every 5 --recycle-every 3 --soak-window 5 --warmup 1)
    echo "soak ($( ((QUICK)) && echo 20 s || echo 10 minutes))..." >&2
    "$LOAD_EXE" "${soak_args[@]}" 2> >(tee "$OUT/soak.log" >&2) | tee "$OUT/soak.md"
    sed -n '/^## /,$p' "$OUT/soak.md" >>"$OUT/summary.md"
}
if ((SOAK_ONLY)); then
    soak
    echo -e "\nresults: $OUT/summary.md" >&2
    exit 0
fi

# --- pure core -----------------------------------------------------------------------------
wait_for_quiet
section "Pure core: time per admission (criterion, pinned to core $CLIENT_CORE)"
crit_args=(--noplot)
((QUICK)) && crit_args+=(--warm-up-time 1 --measurement-time 2)
taskset -c "$CLIENT_CORE" cargo bench --quiet --bench admission -- "${crit_args[@]}" >"$OUT/criterion.txt" 2>&1
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.md"
import glob, json, os, sys
print("| case | body bytes | mean µs | 95% CI µs | MB/s |")
print("|---|---:|---:|---:|---:|")
for path in sorted(glob.glob("target/criterion/*/*/new/estimates.json")):
    group, case = path.split("/")[2:4]
    mean = json.load(open(path))["mean"]
    us = mean["point_estimate"] / 1000
    ci = mean["confidence_interval"]
    throughput = json.load(open(path.replace("estimates.json", "benchmark.json"))).get("throughput") or {}
    body = throughput.get("Bytes", 0)
    rate = f"{body / us:.0f}" if body else ""
    name = case if group == "review" else f"{group.replace('_', '/')}/{case}"
    print(f"| {name} | {body or ''} | {us:.2f} | {ci['lower_bound']/1000:.2f} – {ci['upper_bound']/1000:.2f} | {rate} |")
PY

section "Pure core: allocations per admission"
cargo bench --quiet --bench admission_allocations 2>/dev/null | sed -n '/^|/p' | tee -a "$OUT/summary.md"

section "Pure core: instructions per admission (callgrind; independent of machine load)"
{
    echo "| case | instructions per admission |"
    echo "|---|---:|"
    for fixture in pod-small pod-typical pod-large pod-reinvoked deployment-small deployment-typical deployment-large; do
        runs=20
        valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$fixture.out" \
            --collect-atstart=no --toggle-collect='*profiled_reviews*' \
            "$PROFILE_EXE" "$fixture" "$runs" >/dev/null 2>"$OUT/callgrind.$fixture.log"
        total=$(grep -m1 -oP '(?<=Collected : )[0-9]+' "$OUT/callgrind.$fixture.log")
        echo "| $fixture | $((total / runs)) |"
    done
} | tee -a "$OUT/summary.md"
echo -e "\nInclusive instructions of one pod-typical admission (top entries; x20 runs):\n" | tee -a "$OUT/summary.md"
callgrind_annotate --inclusive=yes "$OUT/callgrind.pod-typical.out" 2>/dev/null |
    grep -E 'kips::|serde_json::(de|ser|read)|base64|ring::digest|malloc|free' | sed -n 1,30p |
    sed -E 's/ \[[^]]*\]$//; s#/root/.cargo/registry/src/[^/]*/##' | tee -a "$OUT/summary.md"

# --- servers under callgrind: where a request's instructions go -------------------------------
if ((QUICK == 0)); then
    section "Server: instructions per request (callgrind, 1000 sequential typical reviews)"
    profile_server() { # name protocol command...
        local name=$1 protocol=$2
        shift 2
        local port certs="$OUT/$name-certs"
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        valgrind --tool=callgrind --callgrind-out-file="$OUT/server.$name.%p.out" \
            "$@" --listen="127.0.0.1:$port" --certs-dir="$certs" >"$OUT/server.$name.log" 2>&1 &
        local vpid=$!
        background_pids+=("$vpid")
        for _ in $(seq 600); do [[ -f "$certs/ca.crt" ]] && break; sleep 0.1; done
        local drive=("$LOAD_EXE" drive --port "$port" --ca "$certs/ca.crt" --protocol "$protocol")
        for _ in $(seq 100); do "${drive[@]}" --count 1 >/dev/null 2>&1 && break; sleep 0.2; done
        "${drive[@]}" --count 200 >/dev/null # warm
        callgrind_control -z "$vpid" >/dev/null
        "${drive[@]}" --count 1000 >/dev/null
        callgrind_control -d "$vpid" >/dev/null
        kill -TERM "$vpid"
        wait "$vpid" 2>/dev/null || true
        local dump
        dump=$(ls "$OUT"/server."$name".*.out.1)
        local total
        total=$(callgrind_annotate "$dump" 2>/dev/null | grep -oP '^[0-9,]+(?= \(100.0%\)  PROGRAM TOTALS)' | tr -d ,)
        echo "| $name | $protocol | $((total / 1000)) |"
    }
    {
        echo "| server | protocol | instructions per request |"
        echo "|---|---|---:|"
        for protocol in h1 h2; do
            profile_server "kips-$protocol" "$protocol" "$KIPS_EXE" webhook
            profile_server "ceiling-$protocol" "$protocol" "$LOAD_EXE" ceiling-server
        done
    } | tee -a "$OUT/summary.md"
    echo -e "\nkips, h2: inclusive instructions per 1000 requests (top entries):\n" | tee -a "$OUT/summary.md"
    callgrind_annotate --inclusive=yes "$(ls "$OUT"/server.kips-h2.*.out.1)" 2>/dev/null |
        grep -E 'kips::(admission|server)|tracing_subscriber::fmt::Subscriber|Span::record_all|rustls::record_layer|h2::proto::connection' |
        sed -n 1,16p | sed -E 's/ \[[^]]*\]$//' | tee -a "$OUT/summary.md"
fi

# --- load and cold start --------------------------------------------------------------------
wait_for_quiet
load_args=(--bench --server-core "$SERVER_CORE" --client-core "$CLIENT_CORE")
((QUICK)) && load_args+=(--duration 1 --warmup 0.3 --sizes typical --cold-starts 5)
echo "load benchmark (several minutes)..." >&2
"$LOAD_EXE" "${load_args[@]}" 2> >(tee "$OUT/load.log" >&2) | tee "$OUT/load.md"
sed -n '/^## /,$p' "$OUT/load.md" >>"$OUT/summary.md"

# --- relay bridge -----------------------------------------------------------------------------
wait_for_quiet
bridge_args=(--bench)
((QUICK)) && bridge_args+=(--bytes 67108864 --streams 200 --samples 100 --runs 1)
echo "bridge benchmark (a few minutes)..." >&2
BRIDGE_EXE=$(bench_exe bridge)
"$BRIDGE_EXE" "${bridge_args[@]}" 2> >(tee "$OUT/bridge.log" >&2) | tee "$OUT/bridge.md"
sed -n '/^## /,$p' "$OUT/bridge.md" >>"$OUT/summary.md"

soak

echo -e "\nresults: $OUT/summary.md" >&2
