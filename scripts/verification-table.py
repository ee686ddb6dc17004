#!/usr/bin/env python3
"""Refresh the README's verification table from docs/verification/*.json and docs/verification/kernels.tsv.

Two columns per kernel:
- emulated: the latest SIMT-emulator report (scripts/emu-test --record, device "emu") in which every test
  the row names passed under every variant that ran it, and ran under all four thread schedules and
  AddressSanitizer + UBSan (ThreadSanitizer is listed when its small-grid subset covered the row);
- GPU: the latest GPU report (scripts/gpu-suite record) in which every test the row names passed, the
  run's `fusekit check` exited 0, and compute-sanitizer memcheck found no error in those tests' binaries."""
import glob
import json
import os

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
vdir = os.path.join(root, "docs", "verification")
gpu_reports, emu_reports = [], []
for p in sorted(glob.glob(os.path.join(vdir, "*.json"))):
    with open(p) as f:
        r = json.load(f)
    r["_file"] = os.path.relpath(p[:-5] + ".md", root)
    (emu_reports if r.get("device") == "emu" else gpu_reports).append(r)
gpu_reports.sort(key=lambda r: r["date"], reverse=True)
emu_reports.sort(key=lambda r: r["date"], reverse=True)
SCHEDULES = ["round-robin", "warp-greedy", "warp-greedy-reversed", "random"]


def link(r):
    return f"[{os.path.basename(r['_file'])}]({r['_file']})"


def commit(r):
    return f"`{r['commit'][:8]}`{' (dirty)' if r['dirty'] else ''}"


def emulated(binary, pattern):
    for r in emu_reports:
        by_variant = {}
        for res in r["results"]:
            if res["binary"] != binary:
                continue
            ts = [t for t in res["tests"] if pattern in t["name"]]
            if ts:
                by_variant[res["variant"]] = all(t["status"] == "ok" for t in ts)
        needed = SCHEDULES + ["asan"]
        if all(by_variant.get(v) for v in needed) and all(by_variant.values()):
            extra = ", tsan" if by_variant.get("tsan") else ""
            return f"{r['date'][:10]} {commit(r)} (4 schedules, asan{extra}) {link(r)}"
    return "not yet"


def on_gpu(binary, pattern, family):
    if family == "emu":
        return "n/a (emulator only)"
    for r in gpu_reports:
        ts = [t for t in r["tests"] if t["binary"] == binary and pattern in t["name"]]
        san = [s for s in r["sanitizer"] if s["binary"] == binary and s["tool"] == "memcheck"]
        if ts and all(t["status"] == "ok" for t in ts) and san and all(s["exit"] == 0 for s in san) \
                and r.get("check_exit") == 0:
            return f"{r['date'][:10]} {r['gpu']} {commit(r)} {link(r)}"
    return "not yet"


rows = []
with open(os.path.join(vdir, "kernels.tsv")) as f:
    for line in f:
        line = line.rstrip("\n")
        if not line or line.startswith("#"):
            continue
        kernel, family, binary, pattern = line.split("\t")
        rows.append(f"| `{kernel}` | {family} | {emulated(binary, pattern)} | {on_gpu(binary, pattern, family)} |")

table = ["| kernel | family | emulated (SIMT emulator) | GPU |", "| --- | --- | --- | --- |"] + rows
readme = os.path.join(root, "README.md")
with open(readme) as f:
    text = f.read()
begin, end = "<!-- verification:begin -->", "<!-- verification:end -->"
a, b = text.index(begin) + len(begin), text.index(end)
text = text[:a] + "\n" + "\n".join(table) + "\n" + text[b:]
with open(readme, "w") as f:
    f.write(text)
print("\n".join(table))
