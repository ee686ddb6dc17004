#!/usr/bin/env python3
"""gpu-report.py ROOT: turn the logs of run.sh (ROOT/logs, one or several phases merged) into
ROOT/report.json and ROOT/report.md (with each benchmark's prediction from kernels/predictions.tsv
beside its measurement)."""
import datetime
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import predictions  # noqa: E402

out = sys.argv[1]
logs = os.path.join(out, "logs")


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


commit_lines = read(os.path.join(logs, "COMMIT")).split()
commit = commit_lines[0] if commit_lines else "unknown"
dirty = "dirty" in commit_lines
gpu_line = read(os.path.join(logs, "gpu.txt")).strip().splitlines()
gpu_fields = [x.strip() for x in (gpu_line[0].split(",") if gpu_line else [])]
gpu = gpu_fields[0] if gpu_fields else "unknown GPU"
driver = gpu_fields[1] if len(gpu_fields) > 1 else "unknown"
now = datetime.datetime.now(datetime.timezone.utc)

tests, binaries = [], []
for line in read(os.path.join(logs, "tests.txt")).splitlines():
    m = re.match(r"(\S+) (?:exit=(\d+)|skipped=budget)", line)
    if not m:
        continue
    # exit None: not run, the call's time budget was spent (run.sh --budget)
    name, code = m.group(1), (int(m.group(2)) if m.group(2) else None)
    binaries.append({"binary": name, "exit": code})
    log = read(os.path.join(logs, f"test-{name}.log"))
    for t in re.finditer(r"^test (.+?) \.\.\. (ok|FAILED|ignored)", log, re.M):
        tests.append({"binary": name, "name": t.group(1), "status": t.group(2)})
    for s in re.finditer(r"^SKIP \(no CUDA device\): (.+)$", log, re.M):
        tests.append({"binary": name, "name": s.group(1), "status": "skip"})

sanitizer = []
for line in read(os.path.join(logs, "sanitizer.txt")).splitlines():
    m = re.match(r"(\w+) (\S+) (?:exit=(\d+)|skipped=budget)", line)
    if not m:
        continue
    tool, name, code = m.group(1), m.group(2), (int(m.group(3)) if m.group(3) else None)
    log = read(os.path.join(logs, f"sanitizer-{tool}-{name}.log"))
    e = re.search(r"ERROR SUMMARY: (\d+) error", log)
    sanitizer.append({"tool": tool, "binary": name, "exit": code,
                      "errors": int(e.group(1)) if e else None})

check_text = read(os.path.join(logs, "check.log"))
m = re.search(r"check exit=(\d+)", check_text)
check_exit = int(m.group(1)) if m else None  # None: not run (or skipped for the time budget)

benches = []
for path in sorted(glob.glob(os.path.join(logs, "bench-*.log")) + glob.glob(os.path.join(logs, "peer-*.log"))):
    for line in read(path).splitlines():
        m = re.match(r"^(FUSEKIT_BENCH|FUSEKIT_PEER) (\{.*\})\s*$", line)
        if m:
            try:
                rec = json.loads(m.group(2))
            except ValueError:
                continue
            rec["source"] = "fusekit" if m.group(1) == "FUSEKIT_BENCH" else "peer"
            benches.append(rec)
bench_exits = read(os.path.join(logs, "benches.txt")).split("\n")
peer_exits = read(os.path.join(logs, "peers.txt")).split("\n")

slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")[:32] or "gpu"
stem = f"{now:%Y-%m-%d}-{slug}-{commit[:8]}"
failed = [t for t in tests if t["status"] in ("FAILED", "skip")]
san_bad = [s for s in sanitizer if s["exit"] != 0]
bad_bins = [b for b in binaries if b["exit"] != 0]
phases = [p for p, f in (("tests", "tests.txt"), ("sanitize", "sanitizer.txt"), ("bench", "benches.txt"),
                          ("peers", "peers.txt")) if os.path.exists(os.path.join(logs, f))]
green = (not failed and not san_bad and not bad_bins and check_exit == 0 and sanitizer != []
         and all(p in phases for p in ("tests", "sanitize", "bench", "peers")))

report = {
    "stem": stem, "date": now.isoformat(timespec="seconds"), "gpu": gpu, "driver": driver,
    "commit": commit, "dirty": dirty, "green": green, "phases": phases, "tests": tests, "binaries": binaries,
    "sanitizer": sanitizer, "check_exit": check_exit, "check": check_text, "benches": benches,
    "bench_exits": [l for l in bench_exits if l], "peer_exits": [l for l in peer_exits if l],
}
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)

md = [f"# GPU verification {now:%Y-%m-%d %H:%M} UTC", "",
      f"- GPU: {gpu} (driver {driver})",
      f"- commit: `{commit}`{' + uncommitted changes' if dirty else ''}",
      f"- verdict: {'GREEN' if green else 'NOT GREEN'} (phases run: {', '.join(phases) or 'none'})",
      f"- tests: {sum(t['status'] == 'ok' for t in tests)} ok, {len(failed)} failed/skipped, "
      f"{sum(t['status'] == 'ignored' for t in tests)} ignored, in {len(binaries)} binaries",
      f"- compute-sanitizer: " + (", ".join(
          f"{s['tool']} {s['binary']}: " + ("not run (time budget)" if s["exit"] is None
                                            else f"{s['errors']} errors (exit {s['exit']})")
          for s in sanitizer) or "not run"),
      f"- fusekit check exit: {check_exit if check_exit is not None else 'not run'}"]
md += [f"- host: {line}" for line in read(os.path.join(logs, "host.txt")).strip().splitlines()]
md.append("")
if failed or bad_bins:
    md += ["## Failures", ""]
    md += [f"- `{t['binary']}` {t['name']}: {t['status']}" for t in failed]
    md += [f"- binary `{b['binary']}` " + ("not run: the call's time budget was spent" if b["exit"] is None
                                          else f"exited {b['exit']}" + (" (timeout)" if b["exit"] == 124 else ""))
           for b in bad_bins]
    md.append("")
md += ["## Tests", "", "| binary | test | status |", "| --- | --- | --- |"]
md += [f"| {t['binary']} | {t['name']} | {t['status']} |" for t in tests]
md += ["", "## fusekit check", "", "```", check_text.strip(), "```", "", "## Benchmarks", ""]
if benches:
    keys = []
    for b in benches:
        for k in b:
            if k not in keys and k not in ("bench", "source"):
                keys.append(k)
    md.append("| source | bench | " + " | ".join(keys) + " |")
    md.append("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
    for b in benches:
        cells = []
        for k in keys:
            v = b.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        md.append(f"| {b['source']} | {b['bench']} | " + " | ".join(cells) + " |")
else:
    md.append("no benchmark records")
# Prediction beside measurement (issue 12, item 4): every bench kernels/predictions.tsv predicts.
pred = predictions.load()
pairs = []
for b in benches:
    r = predictions.lookup(pred, b["bench"]) if b["source"] == "fusekit" else None
    if r:
        got = b.get(r["metric"])
        if got is None and r["metric"] == "median_us" and "median_ms" in b:
            got = b["median_ms"] * 1e3
        pairs.append((b["bench"], r, got))
if pairs:
    md += ["", "## Predicted and measured", "",
           "| bench | metric | predicted | measured | basis |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {name} | {r['metric']} | {r['value']:g} | {got:.4g} | {r['basis']} |" if got is not None
           else f"| {name} | {r['metric']} | {r['value']:g} | – | {r['basis']} |" for name, r, got in pairs]
md += ["", "Bench binaries: " + "; ".join(report["bench_exits"]),
       "Peers: " + ("; ".join(report["peer_exits"]) or "none"), ""]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
print("\n".join(md[:9]))
