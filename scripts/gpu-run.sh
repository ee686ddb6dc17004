#!/usr/bin/env bash
# run.sh OUT [--phase all|tests|sanitize|bench|peers] [--quick] [--budget SECONDS] [--only REGEX]:
# the GPU half of scripts/gpu-suite, run from the bundle folder on a GPU host. Needs an NVIDIA driver and
# python3; uses compute-sanitizer and PyTorch (the peers) when present.
#
# A device call lasts at most 10 minutes, and a command killed at that limit leaves nothing behind, so
# run.sh keeps to a time budget (--budget, default 540 s): every step's timeout is cut to what is left,
# a step that would start with under 15 s left is recorded as `skipped=budget`, and the report and the
# logs tarball are always written. The peers stop early themselves (FUSEKIT_DEADLINE). --only restricts
# the tests and the sanitizer to binaries whose name matches REGEX (e.g. 'loss_kernels'), to split a phase
# over several calls. Each call leaves in OUT (few files, as the device tool wants):
#   logs-PHASE.tar.gz   every log of the phase
#   report.md/.json     the report of this phase alone
# `scripts/gpu-suite record DIR...` merges the phases of one bundle into one report.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: run.sh OUT [--phase all|tests|sanitize|bench|peers] [--quick] [--budget SECONDS] [--only REGEX]}
shift
phase=all
quick=""
budget=540
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) phase=$2; shift 2 ;;
    --quick) quick=--quick; shift ;;
    --budget) budget=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 64 ;;
  esac
done
deadline=$(( $(date +%s) + budget ))
export FUSEKIT_DEADLINE=$deadline
[ -n "$quick" ] && export FUSEKIT_QUICK=1
# Seconds left for steps, keeping 20 s for the report and the tarball.
left() { echo $(( deadline - $(date +%s) - 20 )); }
# run_capped LIMIT LOG CMD...: runs CMD (output to LOG) under a timeout of min(LIMIT, what is left);
# prints `exit=N`, or `skipped=budget` without running it when under 15 s are left.
run_capped() {
  local limit=$1 log=$2 l
  shift 2
  l=$(left)
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 15 ]; then
    echo "skipped: the run's time budget was spent" > "$log"
    echo "skipped=budget"
    return 0
  fi
  timeout "$limit" "$@" > "$log" 2>&1
  echo "exit=$?"
}
selected() { [ -z "$only" ] || [[ $1 =~ $only ]]; }
mkdir -p "$out"
root=$(mktemp -d)
logs="$root/logs"
mkdir -p "$logs"
cp "$here/COMMIT" "$here/BUILT" "$logs/" 2>/dev/null
export FUSEKIT_REQUIRE_GPU=1
# The kernel tests run on the emulator and on the GPU; here only the GPU half (the emulated half runs in
# CI, scripts/emu-test, and its libraries are not in the bundle).
export FUSEKIT_BACKENDS=gpu
export RUST_BACKTRACE=1
export PYTHONUNBUFFERED=1
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
# What the host offers, for reading a failure later (each line bounded in time).
{
  echo "uname: $(uname -srm)"
  echo "glibc: $(ldd --version 2>&1 | head -n 1)"
  echo "compute-sanitizer: $(timeout 20 compute-sanitizer --version 2>&1 | tail -n 1)"
  echo "torch: $(timeout 60 python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1)"
  echo "budget: ${budget} s, phase ${phase}${quick:+, quick}${only:+, only ${only}}"
} > "$logs/host.txt" 2>&1

if want tests; then
  echo "== GPU tests"
  # The binaries that launch kernels first: when the budget runs short, the CPU-only ones (which CI
  # runs anyway) are the ones left out.
  for t in "$here"/tests/*_kernels "$here"/tests/emu_conformance "$here"/tests/probe "$here"/tests/device \
      "$here"/tests/cli $(ls "$here"/tests/* | grep -v -e '_kernels$' -e '/emu_conformance$' -e '/probe$' \
      -e '/device$' -e '/cli$'); do
    [ -x "$t" ] || continue
    n=$(basename "$t")
    selected "$n" || continue
    echo "$n $(run_capped 900 "$logs/test-$n.log" "$t" --test-threads=1)" | tee -a "$logs/tests.txt"
  done
  if selected check; then
    echo "== fusekit check"
    st=$(run_capped 300 "$logs/check.log" "$here/bin/fusekit" check --require-gpu)
    echo "check $st" >> "$logs/check.log"
  fi
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
      for t in "$here"/tests/*_kernels "$here"/tests/emu_conformance "$here"/tests/probe "$here"/tests/cli; do
        [ -x "$t" ] || continue
        n=$(basename "$t")
        selected "$n" || continue
        st=$(run_capped 1200 "$logs/sanitizer-$tool-$n.log" "$san" --tool "$tool" --error-exitcode 99 \
          --print-limit 50 "$t" --test-threads=1 --skip more_than_2_pow_31 \
          --skip balance_demonstration_at_full_scale)
        echo "$tool $n $st" | tee -a "$logs/sanitizer.txt"
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
    echo "$n $(run_capped 1500 "$logs/bench-$n.log" "$b" "${args[@]}")" | tee -a "$logs/benches.txt"
  done
fi

if want peers; then
  echo "== peers"
  for p in "$here"/peers/*.py; do
    [ -f "$p" ] || continue
    case "$(basename "$p")" in _*) continue ;; esac  # helpers, not peers
    n=$(basename "$p" .py)
    echo "$n $(run_capped 1500 "$logs/peer-$n.log" python3 "$p")" | tee -a "$logs/peers.txt"
  done
fi

python3 "$here/gpu-report.py" "$root"
tar czf "$out/logs-$phase.tar.gz" -C "$root" logs
cp "$root/report.md" "$root/report.json" "$out/"
