"""The GPU check's report: one JSON and one markdown table."""

from __future__ import annotations

import json
import os


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _size(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else str(n)


def markdown(result: dict) -> str:
    info, tests = result["info"], result["tests"]
    lines = [f"# arrayopt GPU check ({result['date']}, {'quick' if result['quick'] else 'full'})", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in info.items() if v is not None))
    lines.append("")
    if tests.get("ran"):
        lines.append(f"GPU tests (`{tests['command']}`): {tests['passed']} passed, "
                     f"{tests['failed']} failed, {tests['skipped']} skipped in {tests['seconds']} s")
        lines += [f"- FAILED {name}" for name in tests["failures"]]
        lines += [f"- skipped ({k}): {reason}" for reason, k in tests["skip_reasons"].items()]
    else:
        lines.append(f"GPU tests: not run ({tests.get('note', '')})")
    lines.append("")
    lines.append("All float32; ms = median per step over back-to-back steps (device synchronised "
                 "around each run), contenders interleaved in one process.")
    lines.append("")
    lines += ["| section | params | what | ms | ratio |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        ratios = [f"{_fmt(row[k])} {label}" for k, label in (
            ("GB_per_s", "GB/s"), ("x_floor", "× floor"), ("x_torch_fused", "× torch fused"),
            ("x_our_adam", "× our Adam"), ("x_host_eigh", "× host eigh"),
            ("max_rel_diff_vs_eigh", "max rel. diff vs eigh")) if k in row]
        what = row["what"] + (f" ({row['note']})" if row.get("note") else "")
        size = row.get("shape") or (f"{row['tree']} ({_size(row['n'])})" if "tree" in row else _size(row["n"]))
        lines.append(f"| {row['section']} | {size} | {what} | {_fmt(row.get('ms'))} | "
                     f"{', '.join(ratios)} |")
    for err in result["errors"]:
        lines.append(f"\nERROR in {err['section']}: {err['error']}")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str) -> tuple:
    js, md = os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.md")
    with open(js, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(md, "w", encoding="utf-8") as f:
        f.write(text)
    return js, md, text
