# Sourced by the gpu_*.sh scripts: run from the repository root, results under benchmarks/results/ (and the
# logs in $OUT when set), and `step NAME TIMEOUT_S COMMAND...`, which runs a command, tees its log, reports
# its exit status and time, and records a failure in $status without stopping the script.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
logs="${OUT:-benchmarks/results}"
mkdir -p "$logs" benchmarks/results
python="${PYTHON:-python3}"
status=0

# A device call brings back at most 8 files from $OUT (the device README's limits): at exit, everything the
# steps left there (logs, the JSON copies, quality_sweep/) goes into one archive, $OUT/gpu_out.tgz; unpack it
# here with `tar -xzf FILES_AT/gpu_out.tgz -C DIR`.
pack_out() {
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
    local entries
    entries=$(cd "$OUT" && ls -A | grep -vx gpu_out.tgz)
    [ -n "$entries" ] || return 0
    # An earlier script of the same device call packed its results already: merge them, the files this
    # script wrote winning over the archive's older ones of the same name.
    if [ -f "$OUT/gpu_out.tgz" ]; then
        (cd "$OUT" && tar -xzf gpu_out.tgz --skip-old-files && rm gpu_out.tgz)
        entries=$(cd "$OUT" && ls -A)
    fi
    # shellcheck disable=SC2086  # the entries are names this script's steps chose: no spaces
    (cd "$OUT" && tar -czf /tmp/gpu_out.tgz $entries && rm -rf $entries && mv /tmp/gpu_out.tgz gpu_out.tgz)
}
trap pack_out EXIT

step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"  # for a step run in the background, whose $status change stays in its subshell
}
