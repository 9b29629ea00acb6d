#!/usr/bin/env bash
# Fuzzes kips with cargo-fuzz (libFuzzer): builds fuzz/ on nightly, seeds each target's
# corpus from the test fixtures and examples of annotation values, runs each target for the
# given time, one after another, and prints executions and findings per target.
#
#   scripts/fuzz.sh [seconds] [target...]   default: 60 s each, every target (fuzz/README.md)
#
# Corpus, seeds, artifacts and logs stay under fuzz/ in ignored folders (fuzz/.gitignore):
# fuzz/corpus/<target> (grows from run to run), fuzz/seeds/<target> (rewritten each run),
# fuzz/artifacts/<target> (crash-*, timeout-*, oom-*, leak-*: the findings), fuzz/logs/.
# Exits non-zero when a target found something. Not run by CI. Installs cargo-fuzz from
# crates.io when missing; needs a nightly toolchain (KIPS_FUZZ_TOOLCHAIN, default nightly).
# KIPS_FUZZ_CORE pins the fuzzer to one CPU (taskset), leaving the other to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-60}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [seconds] [target...]" >&2; exit 2; }
shift $(($# > 0 ? 1 : 0))
toolchain=${KIPS_FUZZ_TOOLCHAIN:-nightly}

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh needs the $toolchain toolchain: rustup toolchain install $toolchain" >&2
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "installing cargo-fuzz from crates.io..." >&2
    cargo install cargo-fuzz --locked
fi

cd fuzz
mapfile -t all_targets < <(cargo "+$toolchain" fuzz list)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")
for target in "${targets[@]}"; do
    [[ " ${all_targets[*]} " == *" $target "* ]] ||
        { echo "no fuzz target $target (targets: ${all_targets[*]})" >&2; exit 2; }
done

# Per target: its dictionary and the largest input libFuzzer makes (seeds above it are cut).
declare -A dict=([review]=dict/admission.dict [annotations]=dict/annotations.dict [inject_yaml]=dict/admission.dict)
declare -A max_len=([review]=32768 [review_structured]=8192 [annotations]=512 [inject_yaml]=16384
    [bridge_command_line]=4096 [bridge_codecs]=65536)
# The codecs must never allocate by a declared length: a low ceiling catches it.
declare -A rss_limit=([bridge_codecs]=256)

# Seeds, written afresh from the fixtures every run (the corpus keeps what the runs found).
rm -rf seeds
mkdir -p seeds logs
python3 - "$root" <<'PY'
import glob, json, os, sys
root = sys.argv[1]
def write(target, name, data):
    os.makedirs(f"seeds/{target}", exist_ok=True)
    with open(f"seeds/{target}/{name}", "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
reviews = sorted(glob.glob(f"{root}/tests/fixtures/admission/*.json")) + [
    f"{root}/benches/fixtures/{kind}-{size}.json"
    for kind in ("pod", "deployment") for size in ("small", "typical")]
values = {}
for path in reviews:
    name = os.path.basename(path)
    text = open(path, encoding="utf-8").read()
    write("review", name, text)
    review = json.loads(text)
    obj = review["request"].get("object") or {}
    # JSON is YAML: each object alone, and all of them as one stream.
    write("inject_yaml", name, json.dumps(obj, indent=2) + "\n")
    for meta in (obj.get("metadata") or {}, ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}):
        for key, value in (meta.get("annotations") or {}).items():
            if key.startswith("kips.io/"):
                values.setdefault(key, set()).add(value)
stream = "\n---\n".join(json.dumps(json.loads(open(p).read())["request"].get("object") or {}) for p in reviews[:6])
write("inject_yaml", "stream.yaml", stream + "\n")
for path in glob.glob(f"{root}/tests/fixtures/dev/*.yaml"):
    write("inject_yaml", os.path.basename(path), open(path, encoding="utf-8").read())
# The documented forms (README's table) and the fixtures' values.
examples = {
    "kips.io/redirect": ["api:8080", "8080", "api:8080,9090/udp", "api:http/tcp", " api:8080 , 9090/UDP", "http"],
    "kips.io/reverse": ["db=postgres.default.svc:5432", "db=Postgres.default.svc:5432,ip=10.0.0.1:80"],
    "kips.io/relay-secret": ["kips-relay", "my-relay"],
    "kips.io/port-mode": ["iptables", "named", "auto"],
}
for key, found in values.items():
    examples.setdefault(key, []).extend(sorted(found))
index = 0
for key, list_ in examples.items():
    for value in list_:
        write("annotations", f"example-{index}", f"{key}\t{value}\n")
        index += 1
write("annotations", "all", "".join(f"{k}\t{v[0]}\n" for k, v in examples.items()))
write("annotations", "both-ways", "kips.io/redirect\tapi:8080\nkips.io/reverse\t API=db:5432\n")
# kips bridge: the -L/-T expressions kips renders and azbridge documents, and connection
# strings; one per line.
expressions = [
    "0.0.0.0:15100/8080:api", "[::]:15100/8080;[::]:15101/9090:api", "15100/8080:api",
    "127.0.0.1:5353U/5353.udp:dns", "localhost:8080:api", "[::1]:80/http:web",
    "api:8080/localhost:43877", "api:8080/127.0.0.1:8080;9090/localhost:9090",
    "dns:5353.udp/127.0.0.1:5353U", "db:db/db.shop.svc:5432", "relay:[::1]:80", "api:http/host:80",
    "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=a2lwcy1rZXk=",
    "Endpoint=sb://127.0.0.1:9400/;SharedAccessKeyName=root;SharedAccessKey=abcdefgh;EntityPath=api",
    "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=root",
]
for index, line in enumerate(expressions):
    write("bridge_command_line", f"example-{index}", line + "\n")
write("bridge_command_line", "all", "\n".join(expressions) + "\n")
# bridge_codecs: first byte even = a preamble, odd = a chunk size and framed datagrams.
def preamble(mode, name):
    raw = name.encode()
    return bytes([1, 0, mode, len(raw)]) + raw
for index, (mode, name) in enumerate([(0, "8080"), (1, "5353.udp"), (0, "http"), (0, "")]):
    write("bridge_codecs", f"preamble-{index}", bytes([0]) + preamble(mode, name) + b"GET / HTTP/1.1\r\n")
write("bridge_codecs", "preamble-old-version", bytes([0, 2, 0, 0]))
def frame(payload):
    return len(payload).to_bytes(2, "big") + payload
write("bridge_codecs", "datagrams", bytes([1, 3]) + frame(b"hello") + frame(b"") + frame(bytes(300)) + b"\x00")
PY

echo "building the fuzz targets ($toolchain, release with debug assertions)..." >&2
cargo "+$toolchain" fuzz build -O >&2

pin=()
[[ -n ${KIPS_FUZZ_CORE:-} ]] && pin=(taskset -c "$KIPS_FUZZ_CORE")
failed=0
summary=logs/summary.md
{
    echo "# kips fuzz run $(date -u +%FT%TZ), ${seconds} s per target, $(git -C "$root" rev-parse --short HEAD)"
    echo
    echo "| target | seconds run | executions | exec/s | corpus units | new units | peak RSS MB | findings |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
} >"$summary"
# One target's run; its row of the summary goes to logs/<target>.row, a finding or a failed
# run to logs/<target>.failed.
fuzz_one() {
    local target=$1 seeds=() options log before started status runs rate added rss units findings after
    mkdir -p "corpus/$target" "artifacts/$target"
    rm -f "logs/$target.row" "logs/$target.failed"
    [[ -d seeds/$target ]] && seeds=("seeds/$target")
    options=(-max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb="${rss_limit[$target]:-2048}"
        -max_len="${max_len[$target]:-4096}" -artifact_prefix="artifacts/$target/")
    [[ -n ${dict[$target]:-} ]] && options+=(-dict="${dict[$target]}")
    log=logs/$target.log
    echo "fuzzing $target for ${seconds}s (log: fuzz/$log)..." >&2
    before=$(find "artifacts/$target" -type f | wc -l)
    touch "logs/.$target.start"
    started=$SECONDS
    status=0
    "${pin[@]}" cargo "+$toolchain" fuzz run -O "$target" "corpus/$target" "${seeds[@]}" -- "${options[@]}" >"$log" 2>&1 || status=$?
    final_stat() { grep -oP "^stat::$1:\s+\K[0-9]+" "$log" | tail -1 || echo "?"; }
    runs=$(final_stat number_of_executed_units)
    rate=$(final_stat average_exec_per_sec)
    added=$(final_stat new_units_added)
    rss=$(final_stat peak_rss_mb)
    units=$(find "corpus/$target" -type f | wc -l)
    findings=$(find "artifacts/$target" -maxdepth 1 -type f -newer "logs/.$target.start" 2>/dev/null | xargs -r -n1 basename | paste -sd' ' || true)
    after=$(find "artifacts/$target" -maxdepth 1 -type f | wc -l)
    if ((status != 0 || after > before)); then
        touch "logs/$target.failed"
        [[ -n $findings ]] || findings="exit $status, see fuzz/$log"
        grep -m3 -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log" >&2 || true
    fi
    echo "| $target | $((SECONDS - started)) | $runs | $rate | $units | $added | $rss | ${findings:-none} |" >"logs/$target.row"
}
# KIPS_FUZZ_PARALLEL=1: every target at once (as many processes as targets), else in turn.
if [[ ${KIPS_FUZZ_PARALLEL:-0} == 1 ]]; then
    for target in "${targets[@]}"; do fuzz_one "$target" & done
    wait
else
    for target in "${targets[@]}"; do fuzz_one "$target"; done
fi
for target in "${targets[@]}"; do
    cat "logs/$target.row" >>"$summary"
    [[ -e logs/$target.failed ]] && failed=1
done
cat "$summary"
echo "summary: fuzz/$summary" >&2
exit "$failed"
