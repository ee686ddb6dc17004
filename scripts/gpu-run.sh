#!/usr/bin/env bash
# run.sh OUT [--quick]: the GPU half of scripts/gpu-suite, run from the bundle folder on a GPU host.
# Needs: an NVIDIA driver, python3; uses compute-sanitizer and the peers' PyTorch when present.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: run.sh OUT [--quick]}
quick=${2:-}
mkdir -p "$out/logs"
export FUSEKIT_REQUIRE_GPU=1
export RUST_BACKTRACE=1
export FUSEKIT_BIN="$here/bin/fusekit"

# cuBLAS for the GEMM-peak benchmark: the pip wheels' folder if the system has none on its path.
if ! ldconfig -p 2>/dev/null | grep -q libcublas.so; then
  d=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
  [ -n "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader \
  > "$out/logs/gpu.txt" 2>&1 || echo "nvidia-smi unavailable" > "$out/logs/gpu.txt"

san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)

echo "== GPU tests"
for t in "$here"/tests/*; do
  n=$(basename "$t")
  timeout 900 "$t" --test-threads=1 > "$out/logs/test-$n.log" 2>&1
  echo "$n exit=$?" | tee -a "$out/logs/tests.txt"
done

if [ -n "$san" ]; then
  echo "== compute-sanitizer ($san)"
  tools="memcheck racecheck"
  [ "$quick" = "--quick" ] && tools="memcheck"
  for tool in $tools; do
    for t in "$here"/tests/*_gpu "$here"/tests/probe "$here"/tests/cli; do
      [ -x "$t" ] || continue
      n=$(basename "$t")
      # CPU-only test binaries launch nothing; only these are worth the sanitizer's time.
      # The multi-GB and many-step tests run unsanitised in the main pass; under the sanitizer (10-100x
      # slower) they would not fit a device session.
      timeout 1200 "$san" --tool "$tool" --error-exitcode 99 --print-limit 50 \
        "$t" --test-threads=1 --skip more_than_2_pow_31_elements --skip balance_demonstration_at_full_scale \
        > "$out/logs/sanitizer-$tool-$n.log" 2>&1
      echo "$tool $n exit=$?" | tee -a "$out/logs/sanitizer.txt"
    done
  done
else
  echo "compute-sanitizer not found" | tee "$out/logs/sanitizer.txt"
fi

echo "== fusekit check"
"$here/bin/fusekit" check --require-gpu > "$out/logs/check.log" 2>&1
echo "check exit=$?" >> "$out/logs/check.log"

echo "== benchmarks"
for b in "$here"/benches/*; do
  n=$(basename "$b")
  args=(--bench)
  [ "$quick" = "--quick" ] && args+=(--warm-up-time 0.5 --measurement-time 1)
  timeout 1500 "$b" "${args[@]}" > "$out/logs/bench-$n.log" 2>&1
  echo "$n exit=$?" | tee -a "$out/logs/benches.txt"
done

echo "== peers"
for p in "$here"/peers/*.py; do
  [ -f "$p" ] || continue
  case "$(basename "$p")" in _*) continue ;; esac  # helpers, not peers
  n=$(basename "$p" .py)
  timeout 1500 python3 "$p" > "$out/logs/peer-$n.log" 2>&1
  echo "$n exit=$?" | tee -a "$out/logs/peers.txt"
done

python3 "$here/gpu-report.py" "$here" "$out"
