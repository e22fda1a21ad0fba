"""JUnit XML for CI: one test case per expectation (failed ones carry the observed value), and one per
crash bucket seen (as a failure, so a CI dashboard shows new crashes by signature).

With a comparison against a baseline (harness.analysis.regress.compare_to_baseline), also, under classname
`harness.regressions`: a failure per new crash bucket (its name holds the bucket id and signature), a
passing case per disappeared bucket, and one case per variant for its crash rate, p50/p99 latency,
throughput and each leak trend (rss, heap, fds, threads; the harness's own too), with stable names so a
dashboard tracks them night after night: failed when significantly worse than the baseline (a new or
faster leak; a crash rate, latency or throughput that compare calls `worse`), skipped when the runs
cannot tell (too short, not recorded), passed otherwise.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REGRESSIONS = "harness.regressions"


class _Suite:
    """A testsuite element that keeps its counts."""

    def __init__(self, name: str):
        self.element = ET.Element("testsuite", name=name)
        self.tests = self.failures = self.skipped = 0

    def case(self, classname: str, name: str, *, failure: str | None = None, detail: str = "",
             skipped: str | None = None) -> ET.Element:
        case = ET.SubElement(self.element, "testcase", classname=classname, name=name)
        self.tests += 1
        if failure is not None:
            self.failures += 1
            ET.SubElement(case, "failure", message=failure).text = detail or failure
        elif skipped is not None:
            self.skipped += 1
            ET.SubElement(case, "skipped", message=skipped)
        return case

    def write(self, path: Path) -> None:
        self.element.set("tests", str(self.tests))
        self.element.set("failures", str(self.failures))
        self.element.set("errors", "0")
        self.element.set("skipped", str(self.skipped))
        ET.ElementTree(self.element).write(path, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, report: dict[str, Any], expectations: list[dict[str, Any]],
                regressions: dict[str, Any] | None = None) -> None:
    suite = _Suite(f"harness.{report['scenario']}")
    for expectation in expectations:
        name = expectation["text"] + (f" [phase {expectation['phase']}]" if expectation.get("phase") else "") + \
            (f" [variant {expectation['variant']}]" if expectation.get("variant") else "")
        if expectation["held"]:
            suite.case("harness.expect", name)
        else:
            observed = expectation["observed_text"]
            suite.case("harness.expect", name, failure=observed if expectation.get("evaluated", True) is False
                       else f"observed {observed}",
                       detail=f"scenario line {expectation['line']}: {name}: observed {expectation['observed_text']}")
    for trial in report["trials"]:
        for bucket in trial["buckets"]:
            name = f"crash {bucket['bucket']} {bucket['signature'] or bucket['signal']} [variant {trial['variant']}]"
            suite.case("harness.crashes", name, failure=f"{bucket['count']} crashes, class {bucket['crash_class']}",
                       detail=f"hosts {' '.join(bucket['hosts'])}; example core {bucket['example_core'] or '-'}; "
                              f"harness crashes {report['run_dir']} {bucket['bucket']}")
    if regressions is not None:
        _regression_cases(suite, regressions)
    suite.write(path)


def _regression_cases(suite: _Suite, result: dict[str, Any]) -> None:
    baseline = result["baseline"]["run_id"]
    for b in result["new_buckets"]:
        first = b["first_seen"]
        suite.case(REGRESSIONS, f"new bucket {b['bucket']} {b['signature'] or b['signal']} "
                                f"[variant {', '.join(b['new_in'])}]",
                   failure=f"{b['count']} crashes, class {b['crash_class']}, not in baseline {baseline}",
                   detail=f"first at {first['t']:.1f}s in trial {first['trial']} ({first['variant']}); "
                          f"hosts {' '.join(b['hosts'])}; example core {b['example_core'] or '-'}; "
                          f"harness crashes {result['run']['run_dir']} {b['bucket']}")
    for b in result["gone_buckets"]:
        suite.case(REGRESSIONS, f"gone bucket {b['bucket']} {b['signature'] or b['signal']}")
    for row in result["crash_rate"] + result["performance"]:
        name = f"{row['label']} [variant {row['variant']}]"
        if row["verdict"] == "worse":
            suite.case(REGRESSIONS, name, failure=row["text"], detail=f"{row['text']} vs baseline {baseline}")
        elif "too short" in row["text"]:
            suite.case(REGRESSIONS, name, skipped=row["text"])
        else:
            suite.case(REGRESSIONS, name)
    for row in result["leaks"]:
        name = f"leak {row['metric']} [" + (f"variant {row['variant']}" if row["variant"] is not None else "harness") + "]"
        if row["regression"]:
            suite.case(REGRESSIONS, name, failure=row["text"], detail=f"{row['text']} vs baseline {baseline}")
        elif row["verdict"] == "not comparable":
            suite.case(REGRESSIONS, name, skipped=row["text"])
        else:
            suite.case(REGRESSIONS, name)
