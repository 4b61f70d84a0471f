"""Run the GPU-marked tests (``pytest -m gpu``) of a source checkout and count the outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET


def find_tests(start: str | None = None) -> str | None:
    """The ``tests/`` folder of the checkout: under ``start`` (default: the working
    directory) or beside the ``arrayopt`` package it was imported from."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (start or os.getcwd(), here):
        path = os.path.join(root, "tests")
        if os.path.isfile(os.path.join(path, "conftest.py")):
            return path
    return None


def run(out_dir: str, tests: str | None, extra_args=(), timeout_s: float = 600) -> dict:
    """``pytest -m gpu`` on ``tests``; returns counts, failures and the log's path."""
    if tests is None:
        return {"ran": False, "note": "no tests/ folder (run the command from a source checkout)"}
    xml = os.path.join(out_dir, "gpu_tests.xml")
    log = os.path.join(out_dir, "gpu_tests.log")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *extra_args, tests]
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                cwd=os.path.dirname(tests), timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    shown = ["python", *cmd[1:-2], os.path.basename(tests)]  # paths of this machine left out
    result = {"ran": True, "command": " ".join(shown), "returncode": rc,
              "seconds": round(time.perf_counter() - t0, 1), "log": os.path.basename(log)}
    result.update(_counts(xml))
    if rc is None:
        result["note"] = f"timed out after {timeout_s:.0f} s"
    return result


def _counts(xml: str) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    if not os.path.isfile(xml):
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            why = case.find("skipped").get("message", "")
            counts["skip_reasons"][why] = counts["skip_reasons"].get(why, 0) + 1
        else:
            counts["passed"] += 1
    return counts
