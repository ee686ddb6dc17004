#!/usr/bin/env bash
# run.sh OUT [--phase all|tests|sanitize|bench|peers] [--quick]: the GPU half of scripts/gpu-suite, run from
# the bundle folder on a GPU host. Needs an NVIDIA driver and python3; uses compute-sanitizer and PyTorch
# (the peers) when present. A device session allows 10 minutes a call: run the phases as separate calls
# when the whole suite does not fit one. Each call leaves in OUT (few files, as the device tool wants):
#   logs-PHASE.tar.gz   every log of the phase
#   report.md/.json     the report of this phase alone
# `scripts/gpu-suite record DIR...` merges the phases of one bundle into one report.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: run.sh OUT [--phase all|tests|sanitize|bench|peers] [--quick]}
shift
phase=all
quick=""
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) phase=$2; shift 2 ;;
    --quick) quick=--quick; shift ;;
    *) echo "run.sh: unknown option $1" >&2; exit 64 ;;
  esac
done
mkdir -p "$out"
root=$(mktemp -d)
logs="$root/logs"
mkdir -p "$logs"
cp "$here/COMMIT" "$here/BUILT" "$logs/" 2>/dev/null
export FUSEKIT_REQUIRE_GPU=1
export RUST_BACKTRACE=1
export FUSEKIT_BIN="$here/bin/fusekit"
want() { [ "$phase" = all ] || [ "$phase" = "$1" ]; }

# cuBLAS (linear + CE, GEMM-peak benchmark): the pip wheels' folder if the system has none on its path.
ld_cache=$(ldconfig -p 2>/dev/null || true)
if ! grep -q libcublas.so <<<"$ld_cache"; then
  d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
  [ -n "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader \
  > "$logs/gpu.txt" 2>&1 || echo "nvidia-smi unavailable" > "$logs/gpu.txt"

if want tests; then
  echo "== GPU tests"
  for t in "$here"/tests/*; do
    n=$(basename "$t")
    timeout 900 "$t" --test-threads=1 > "$logs/test-$n.log" 2>&1
    echo "$n exit=$?" | tee -a "$logs/tests.txt"
  done
  echo "== fusekit check"
  "$here/bin/fusekit" check --require-gpu > "$logs/check.log" 2>&1
  echo "check exit=$?" >> "$logs/check.log"
fi

if want sanitize; then
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$san" ]; then
    echo "== compute-sanitizer ($san)"
    tools="memcheck racecheck"
    [ "$quick" = "--quick" ] && tools="memcheck"
    for tool in $tools; do
      # Only the binaries that launch kernels are worth the sanitizer's time. The multi-GB and many-step
      # tests run unsanitised in the tests phase; under the sanitizer (10-100x slower) they would not fit.
      for t in "$here"/tests/*_gpu "$here"/tests/probe "$here"/tests/cli; do
        [ -x "$t" ] || continue
        n=$(basename "$t")
        timeout 1200 "$san" --tool "$tool" --error-exitcode 99 --print-limit 50 \
          "$t" --test-threads=1 --skip more_than_2_pow_31_elements --skip balance_demonstration_at_full_scale \
          > "$logs/sanitizer-$tool-$n.log" 2>&1
        echo "$tool $n exit=$?" | tee -a "$logs/sanitizer.txt"
      done
    done
  else
    echo "compute-sanitizer not found" | tee "$logs/sanitizer.txt"
  fi
fi

if want bench; then
  echo "== benchmarks"
  for b in "$here"/benches/*; do
    n=$(basename "$b")
    args=(--bench)
    [ "$quick" = "--quick" ] && args+=(--warm-up-time 0.5 --measurement-time 1)
    timeout 1500 "$b" "${args[@]}" > "$logs/bench-$n.log" 2>&1
    echo "$n exit=$?" | tee -a "$logs/benches.txt"
  done
fi

if want peers; then
  echo "== peers"
  for p in "$here"/peers/*.py; do
    [ -f "$p" ] || continue
    case "$(basename "$p")" in _*) continue ;; esac  # helpers, not peers
    n=$(basename "$p" .py)
    PYTHONUNBUFFERED=1 timeout 1500 python3 "$p" > "$logs/peer-$n.log" 2>&1
    echo "$n exit=$?" | tee -a "$logs/peers.txt"
  done
fi

python3 "$here/gpu-report.py" "$root"
tar czf "$out/logs-$phase.tar.gz" -C "$root" logs
cp "$root/report.md" "$root/report.json" "$out/"
