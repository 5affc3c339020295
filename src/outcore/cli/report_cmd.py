"""`outcore report RUN.json`: print a report saved with `ooc.report().save(path)`."""
from __future__ import annotations

import json

from ..run.report import Report


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="print a saved run report (ooc.report().save(path))",
        description="Print a report that a run saved with ooc.report().save(path): the budget, "
                    "the plan, and per iteration what moved, what it waited, the resident set.")
    p.add_argument("path", help="report JSON file")
    p.add_argument("--json", action="store_true", help="print it as JSON instead")
    p.set_defaults(func=run)


def run(args) -> int:
    report = Report.load(args.path)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report)
    return 0
