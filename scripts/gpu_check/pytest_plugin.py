"""pytest plugin of the tests step: one JSON line per test outcome, appended to the file named by
$GPU_CHECK_REPORT as each test finishes, so the counts survive a run stopped at its time limit.

Loaded with `-p gpu_check.pytest_plugin` (scripts/ on PYTHONPATH). A line: {"test": node id, "outcome":
passed | failed | skipped | error, "when": setup | call | teardown | collect, "seconds": duration, "message":
the skip reason or the first line of the failure}.
"""
from __future__ import annotations

import json
import os


def _write(record: dict) -> None:
    with open(os.environ["GPU_CHECK_REPORT"], "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    if not report.failed:
        return ""
    lines = [line.strip() for line in report.longreprtext.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]


def pytest_runtest_logreport(report) -> None:
    """The call's outcome; a setup or teardown only when it did not pass (a skip or an error)."""
    if report.when != "call" and report.passed:
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    _write({"test": report.nodeid, "outcome": outcome, "when": report.when,
            "seconds": round(report.duration, 3), "message": _message(report)})


def pytest_collectreport(report) -> None:
    """A module that failed to import (an error) or skipped itself as a whole."""
    if not report.passed:
        _write({"test": report.nodeid, "outcome": "skipped" if report.skipped else "error", "when": "collect",
                "seconds": 0.0, "message": _message(report)})
