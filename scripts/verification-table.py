#!/usr/bin/env python3
"""Refresh the README's verification table from docs/verification/*.json and docs/verification/kernels.tsv.

A kernel counts as verified by a report when every test its row names passed there, the run's binaries and
`fusekit check` exited 0, and compute-sanitizer memcheck found no error in those tests' binaries."""
import glob
import json
import os

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
vdir = os.path.join(root, "docs", "verification")
reports = []
for p in sorted(glob.glob(os.path.join(vdir, "*.json"))):
    with open(p) as f:
        r = json.load(f)
    r["_file"] = os.path.relpath(p[:-5] + ".md", root)
    reports.append(r)
reports.sort(key=lambda r: r["date"], reverse=True)

rows = []
with open(os.path.join(vdir, "kernels.tsv")) as f:
    for line in f:
        line = line.rstrip("\n")
        if not line or line.startswith("#"):
            continue
        kernel, family, binary, pattern = line.split("\t")
        found = None
        for r in reports:
            ts = [t for t in r["tests"] if t["binary"] == binary and pattern in t["name"]]
            san = [s for s in r["sanitizer"] if s["binary"] == binary and s["tool"] == "memcheck"]
            if ts and all(t["status"] == "ok" for t in ts) and san and all(s["exit"] == 0 for s in san) \
                    and r.get("check_exit") == 0:
                found = r
                break
        if found:
            rows.append(f"| `{kernel}` | {family} | {found['date'][:10]} | {found['gpu']} | "
                        f"`{found['commit'][:8]}`{' (dirty)' if found['dirty'] else ''} | [{os.path.basename(found['_file'])}]({found['_file']}) |")
        else:
            rows.append(f"| `{kernel}` | {family} | not yet | - | - | compiled and CPU-tested only |")

table = ["| kernel | family | last verified | GPU | commit | report |",
         "| --- | --- | --- | --- | --- | --- |"] + rows
readme = os.path.join(root, "README.md")
with open(readme) as f:
    text = f.read()
begin, end = "<!-- verification:begin -->", "<!-- verification:end -->"
a, b = text.index(begin) + len(begin), text.index(end)
text = text[:a] + "\n" + "\n".join(table) + "\n" + text[b:]
with open(readme, "w") as f:
    f.write(text)
print("\n".join(table))
