"""predictions.py: kernels/predictions.tsv, read by the GPU-suite reports (gpu-report.py, bench-report.py),
which print each prediction beside the measured value of the same bench."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(root=ROOT):
    rows = []
    # In the repository: kernels/predictions.tsv; in a GPU-suite bundle: next to this script.
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predictions.tsv")
    path = here if os.path.exists(here) else os.path.join(root, "kernels", "predictions.tsv")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            p = line.rstrip("\n").split("\t")
            rows.append({"re": re.compile(p[0]), "metric": p[1], "value": float(p[2]),
                         "basis": p[3] if len(p) > 3 else ""})
    return rows


def lookup(rows, bench):
    """The first prediction whose regex matches the whole bench name, or None."""
    for r in rows:
        if r["re"].fullmatch(bench):
            return r
    return None


def cell(rows, bench):
    """The prediction for a report cell, with its unit, or a dash."""
    r = lookup(rows, bench)
    if not r:
        return "–"
    unit = "%" if r["metric"] == "pct_of_floor" else " µs"
    return f"{r['value']:g}{unit}"
