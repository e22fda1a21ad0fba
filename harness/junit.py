"""JUnit XML for CI: one test case per expectation (failed ones carry the observed value), and one per
crash bucket seen (as a failure, so a CI dashboard shows new crashes by signature)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def write_junit(path: Path, report: dict[str, Any], expectations: list[dict[str, Any]]) -> None:
    suite = ET.Element("testsuite", name=f"harness.{report['scenario']}")
    cases = 0
    failures = 0
    for expectation in expectations:
        name = expectation["text"] + (f" [phase {expectation['phase']}]" if expectation.get("phase") else "") + \
            (f" [variant {expectation['variant']}]" if expectation.get("variant") else "")
        case = ET.SubElement(suite, "testcase", classname="harness.expect", name=name)
        cases += 1
        if not expectation["held"]:
            failures += 1
            ET.SubElement(case, "failure", message=f"observed {expectation['observed_text']}").text = (
                f"scenario line {expectation['line']}: {name}: observed {expectation['observed_text']}")
    for trial in report["trials"]:
        for bucket in trial["buckets"]:
            name = f"crash {bucket['bucket']} {bucket['signature'] or bucket['signal']} [variant {trial['variant']}]"
            case = ET.SubElement(suite, "testcase", classname="harness.crashes", name=name)
            cases += 1
            failures += 1
            ET.SubElement(case, "failure", message=f"{bucket['count']} crashes, class {bucket['crash_class']}").text = (
                f"hosts {' '.join(bucket['hosts'])}; example core {bucket['example_core'] or '-'}; "
                f"harness crashes {report['run_dir']} {bucket['bucket']}")
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
