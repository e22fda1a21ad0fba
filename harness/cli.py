"""Command line: harness run | validate | report.

Exit codes: 0 every expectation held; 1 an expectation failed; 2 usage, scenario or set-up error;
128+N when stopped by signal N (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

from harness.base import units
from harness.base.errors import HarnessError, ScenarioError
from harness.run.isolation import scenario_problem
from harness.scenario.loader import load_scenario

EXIT_OK, EXIT_EXPECTATION, EXIT_USAGE = 0, 1, 2


def _duration_arg(text: str) -> float:
    try:
        return units.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _html_default() -> bool:
    """Writing the page costs a few seconds (matplotlib): a caller running many short runs (a test
    suite) may turn it off with HARNESS_HTML=off."""
    return os.environ.get("HARNESS_HTML", "on").lower() not in ("off", "0", "no", "false")


def _parser() -> argparse.ArgumentParser:
    # One declaration per command and option, read top to bottom like the usage text: long, but a table,
    # not logic.
    parser = argparse.ArgumentParser(prog="harness", description="Fault-injection stress harness for native services.")
    parser.add_argument("--version", action="version", version=f"harness {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario against a real fleet")
    soak = sub.add_parser("soak", help="a long run (default: the scenario's duration) judged against a baseline "
                                       "run: new crash buckets, leaks, rate and latency changes (docs/soak.md)")
    soak.add_argument("--baseline", metavar="RUN|latest-good",
                      help="compare with this run, or the newest complete run of the scenario that passed")
    for command in (run, soak):
        command.add_argument("scenario", type=Path)
        command.add_argument("--variant", help="run only this variant")
        command.add_argument("--trials", type=int, help="repeats of each variant (overrides the scenario)")
        command.add_argument("--seed", type=int, help="override the scenario's seed")
        command.add_argument("--duration", type=_duration_arg, help="override the duration (e.g. 30s)")
        command.add_argument("--results", "--out", dest="results", type=Path, default=Path("results"), metavar="DIR",
                             help="where runs are kept (default: results; --out is the older name)")
        command.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
        command.add_argument("--quiet", action="store_true", help="no live status line")
        command.add_argument("--junit", type=Path, help="also write JUnit XML (one case per expectation and crash bucket)")
        command.add_argument("--metrics", metavar="ADDR:PORT",
                         help="serve Prometheus /metrics here during the run (e.g. 127.0.0.1:9108)")
        command.add_argument("--html", action=argparse.BooleanOptionalAction, default=_html_default(),
                             help="write RUN/report.html at the end (default: on; HARNESS_HTML=off turns it off)")
        command.add_argument("--rollup-after", type=_duration_arg, default=3600.0, metavar="DURATION",
                         help="keep per-second samples for this long, then one row per --rollup-every (default 1h)")
        command.add_argument("--rollup-every", type=_duration_arg, default=60.0, metavar="DURATION",
                         help="the rolled-up window (default 1m)")
        _cluster_option(command)

    resume = sub.add_parser("resume", help="finish a run stopped by SIGKILL, a reboot, a full disk or Ctrl-C")
    resume.add_argument("run", help="a results/<run-id> directory, a run id, or 'latest'")
    _results_option(resume)
    resume.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    resume.add_argument("--quiet", action="store_true", help="no live status line")
    resume.add_argument("--junit", type=Path, help="also write JUnit XML")
    resume.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus /metrics here")
    resume.add_argument("--html", action=argparse.BooleanOptionalAction, default=_html_default(),
                        help="write RUN/report.html at the end (default: on)")
    _cluster_option(resume)

    compare = sub.add_parser("compare", help="compare the variants of one or more runs, with statistics")
    compare.add_argument("runs", nargs="+", help="results/<run-id> directories, run ids, or 'latest'")
    compare.add_argument("--baseline", help="the variant the others are compared with (default: the first)")
    compare.add_argument("--min-difference", type=float, default=None,
                         help="smallest relative change that matters, e.g. 0.1 for 10%%")
    compare.add_argument("--json", action="store_true", help="the JSON form (docs/compare.md)")
    _results_option(compare)

    calibrate = sub.add_parser("calibrate", help="fit a simulated host model to a real run (prints fleet.simulated)")
    calibrate.add_argument("run", help="a results/<run-id> directory, a run id, or 'latest'")
    calibrate.add_argument("--trial", type=int, help="which trial (default: the first)")
    calibrate.add_argument("--hosts", type=int, default=None, help="hosts in the printed model (default: the run's)")
    calibrate.add_argument("--json", action="store_true")
    _results_option(calibrate)

    crashes = sub.add_parser("crashes", help="crash buckets of a run, or one bucket's backtrace and fault context")
    crashes.add_argument("run", help="a results/<run-id> directory, a run id, or 'latest'")
    crashes.add_argument("bucket", nargs="?", help="a bucket id (or a prefix of one)")
    crashes.add_argument("--json", action="store_true",
                         help="the buckets (or the one bucket's crashes and triage) as JSON")
    _results_option(crashes)
    crashes.add_argument("--bundle", type=Path, metavar="FILE",
                         help="write the bucket's example core with the executable, every mapped object, the triage "
                              "and a gdb command file to this archive (.tar.gz, .tar.xz)")
    crashes.add_argument("--gdb", action="store_true", help="open the bucket's example core in gdb")

    cores = sub.add_parser("cores", help="collect cores through a core_pattern pipe handler (root)")
    cores.add_argument("action", choices=["install", "uninstall", "status"])
    cores.add_argument("--spool", type=Path, default=None, help="where spooled cores go (default /var/lib/harness/cores)")
    cores.add_argument("--max-bytes", type=_size_arg, default=None, help="largest core kept (e.g. 1GiB)")
    cores.add_argument("--keep-exe", action="append", default=None,
                       help="only these programs' cores go to the spool; others go where they went before")
    cores.add_argument("--max-age", type=_duration_arg, default=None,
                       help="unclaimed records and cores older than this are removed (default 7d)")

    validate = sub.add_parser("validate", help="check scenario files (or directories of them)")
    validate.add_argument("paths", type=Path, nargs="+")

    report = sub.add_parser("report", help="summarize a past run")
    report.add_argument("run", help="a results/<run-id> directory, a run id, or 'latest'")
    report.add_argument("--json", action="store_true", help="the stable JSON schema (docs/report-json.md)")
    report.add_argument("--junit", type=Path, help="also write JUnit XML (one case per expectation and crash bucket)")
    report.add_argument("--html", nargs="?", const="", default=None, metavar="FILE",
                        help="write the HTML report (default RUN/report.html) and print its path instead of the "
                             "text summary (with --json, the path goes to stderr); `--html latest` with no other "
                             "RUN names the run, not the file")
    _results_option(report)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("harness")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cluster_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--cluster", metavar="ADDRESS", default=None,
                         help="run the trials on this Dask scheduler (e.g. tcp://10.0.0.5:8786; default: "
                              "$HARNESS_CLUSTER): simulated trials spread over its workers, or a real fleet's "
                              "hosts placed on their machines (docs/cluster.md)")


def _cluster_engine_needed(args: argparse.Namespace) -> bool:
    from harness.cluster.connect import cluster_address
    return cluster_address(args.cluster) is not None


def _cluster(args: argparse.Namespace) -> str | None:
    """The cluster to run on (--cluster, else $HARNESS_CLUSTER), checked before anything starts."""
    from harness.cluster.connect import cluster_address, require_engine
    address = cluster_address(args.cluster)
    if address is None:
        return None
    require_engine()
    return address


def _results_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--results", type=Path, default=Path("results"), metavar="DIR",
                         help="where runs are kept, for run ids and 'latest' (default: results)")


def _report_args(argv: list[str] | None) -> list[str] | None:
    """`harness report --html RUN`: --html takes a FILE only when a RUN is given too, so `--html latest` alone
    names the run (and writes RUN/report.html), never a file called 'latest'."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "report" or "--html" not in args:
        return argv
    at = args.index("--html")
    positional, skip = [], False
    for i, word in enumerate(args[1:], start=1):
        if skip or i in (at, at + 1):
            skip = False
            continue
        if word in ("--junit", "--results"):       # options of `report` that take a value
            skip = True
        elif not word.startswith("-"):
            positional.append(word)
    if at + 1 < len(args) and not args[at + 1].startswith("-") and not positional:
        args[at:at + 2] = [args[at + 1], "--html"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_report_args(argv))
    try:
        if args.command == "validate":
            return _validate(args.paths)
        if args.command == "report":
            return _report(args)
        if args.command == "crashes":
            return _crashes(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "cores":
            return _cores(args)
        if args.command in ("run", "soak", "resume") and _cluster_engine_needed(args):
            from harness.cluster.connect import require_engine
            require_engine()      # before anything else: one line on how to install it
        if args.command == "resume":
            return _resume(args, sys.argv if argv is None else ["harness", *argv])
        return _run(args, sys.argv if argv is None else ["harness", *argv])
    except ScenarioError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `harness crashes RUN | head`: the reader went away; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except BaseExceptionGroup as group:
        # trio's nurseries wrap errors in groups; a user-facing error stays one line.
        leaves = _leaves(group)
        user_errors = [e for e in leaves if isinstance(e, HarnessError)]
        if user_errors and len(user_errors) == len(leaves):
            print(f"harness: error: {user_errors[0]}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves


def _validate(paths: list[Path]) -> int:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
        else:
            files.append(path)
    failed = 0
    for file in files:
        try:
            scenario = load_scenario(file)
            from harness.run.proofcheck import allocator_problems
            refused = allocator_problems(scenario)   # executables already there: a preload that cannot work
            if refused:
                raise ScenarioError(refused)
            missing = scenario_problem(scenario)   # what this machine lacks for it (root, cgroups, namespaces)
            if missing:
                failed += 1
                print(f"{file}: {missing}", file=sys.stderr)
                continue
            mix = ", ".join(f"{g.hosts} {g.name}" for g in scenario.fleet.groups)
            print(f"{file}: ok ({scenario.fleet.hosts} hosts{': ' + mix if mix else ''}, "
                  f"{units.format_duration(scenario.duration)}, "
                  f"{len(scenario.faults)} faults, {len(scenario.expect)} expectations)")
            from harness.run.capacity import rate_warning
            warning = rate_warning(scenario)
            if warning:
                print(f"{file}: warning: {warning}", file=sys.stderr)
            from harness.scenario.needs import machine_loss_problem
            needs_cluster = machine_loss_problem(scenario)
            if needs_cluster:
                print(f"{file}: note: {needs_cluster}; a local run refuses it", file=sys.stderr)
        except ScenarioError as exc:
            failed += 1
            for problem in exc.problems:
                print(problem, file=sys.stderr)
    if not files:
        print("harness: error: no scenario files given", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE if failed else EXIT_OK


def _judge(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from harness.analysis.expect import evaluate
    from harness.analysis.report import build_report
    from harness.plan.cut import plan_cut
    report = build_report(run_dir)
    expectations: list[dict[str, Any]] = []
    try:
        scenario = _saved_scenario(run_dir)  # the plan as written: a --duration may have cut the run short
        cut = plan_cut(scenario, float(report["duration"]))
        report["plan_cut"] = cut.to_json() if cut.cut else None
        expectations = evaluate(scenario, report, {e.index: why for e, why in cut.expectations})
    except ScenarioError:
        scenario = None  # the saved copy no longer validates (older harness): report without judging
    if scenario is not None and scenario.compare_expect:
        expectations += _judge_comparisons(scenario, run_dir, report)
    report["expectations"] = expectations
    return report, expectations


def _saved_scenario(run_dir: Path) -> Any:
    """The run's copy of its scenario, its relative paths (target.root, files) resolved where the scenario
    file was when it ran (as the run resolved them: a copy with `files: services/x.vcl` does not validate
    in the run folder); in the run folder if that is unknown or gone."""
    from harness.base.yamlsource import parse_source
    from harness.scenario.loader import build_scenario
    from harness.store.resume import Invocation
    from harness.store.runstore import open_run
    saved = run_dir / "scenario.yaml"
    try:
        store = open_run(run_dir)
        try:
            invocation = store.meta("invocation")
        finally:
            store.close()
    except Exception:       # noqa: BLE001 - an older or damaged store: the copy where it is
        invocation = None
    if invocation is not None:
        where = Path(Invocation.from_json(invocation).scenario_base) / saved.name
        try:
            return build_scenario(parse_source(saved.read_text(encoding="utf-8"), str(saved)), where)
        except ScenarioError:
            pass
    return load_scenario(saved)


def _write_junit(path: Path | None, report: dict[str, Any], expectations: list[dict[str, Any]],
                 regressions: dict[str, Any] | None = None) -> None:
    if path is None:
        return
    from harness.present.junit import write_junit
    try:
        write_junit(path, report, expectations, regressions)
    except OSError as exc:
        raise HarnessError(f"cannot write {path}: {exc.strerror or exc}") from None


def _judge_comparisons(scenario: Any, run_dir: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """{compare: [a, b], metric: claim} expectations, judged with the statistics of `harness compare`."""
    from harness.analysis.compare import compare_runs, evaluate_variant_expectations
    ran = {t["variant"] for t in report["trials"] if t["status"] == "complete"}
    wanted = [e for e in scenario.compare_expect if e.variant in ran and e.reference in ran]
    results = []
    if wanted:
        try:
            judged = evaluate_variant_expectations(wanted, compare_runs([run_dir], baseline=wanted[0].reference))
        except ValueError as exc:
            judged = [{"text": e.text, "held": False, "observed_text": f"cannot compare: {exc}", "line": e.line,
                       "index": e.index} for e in wanted]
        for item in judged:
            results.append({**item, "metric": item.get("metric"), "phase": None, "variant": None,
                            "observed_text": item.get("observed_text", "")})
    for e in scenario.compare_expect:
        if e not in wanted:
            results.append({"index": e.index, "line": e.line, "text": e.text, "held": True, "phase": None,
                            "variant": None, "metric": e.metric, "observed": None,
                            "observed_text": "skipped (a variant of the pair did not run)"})
    return results


def _run_dir(args: argparse.Namespace) -> Path:
    """The run a command names (a directory, a run id or 'latest'), or a one-line error."""
    from harness.analysis.report import find_run
    try:
        return find_run(args.run, args.results)
    except FileNotFoundError as exc:
        raise HarnessError(str(exc)) from None


def _report(args: argparse.Namespace) -> int:
    from harness.analysis.report import render_text
    run_dir = _run_dir(args)
    report, expectations = _judge(run_dir)
    _write_junit(args.junit, report, expectations)
    html_path = _write_html(run_dir, args.html, report) if args.html is not None else None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        if html_path is not None:
            print(html_path, file=sys.stderr)
    elif html_path is not None:
        print(html_path)
    else:
        print(render_text(report, expectations))
    return EXIT_EXPECTATION if any(not e["held"] for e in expectations) else EXIT_OK


def _write_html(run_dir: Path, target: str, report: dict[str, Any]) -> Path:
    from harness.present.html import write_html_report
    try:
        return write_html_report(run_dir, Path(target) if target else None, report=report)
    except OSError as exc:
        raise HarnessError(f"cannot write {target or run_dir / 'report.html'}: {exc.strerror or exc}") from None


def _size_arg(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cores(args: argparse.Namespace) -> int:
    from harness.collect import coreinstall
    spool = args.spool or coreinstall.DEFAULT_SPOOL
    try:
        if args.action == "install":
            options: dict[str, Any] = {}
            if args.max_bytes is not None:
                options["max_bytes"] = args.max_bytes
            if args.keep_exe:
                options["keep_exe"] = args.keep_exe
            if args.max_age is not None:
                options["max_age_seconds"] = int(args.max_age)
            result = coreinstall.install(spool, **options)
            print(f"core_pattern is now {result.pattern}")
            print(f"cores go to {result.spool_dir}; `harness cores uninstall` restores the previous pattern")
        elif args.action == "uninstall":
            undone = coreinstall.uninstall(spool)
            print(("restored" if undone.restored else "left alone (not ours)") + f": core_pattern is {undone.pattern}")
        else:
            state = coreinstall.status(spool)
            print(json.dumps(state, indent=2, default=str))
            if state["handler_runnable"] is False:  # installed, and every core on the machine is being lost
                print(f"harness: error: {state['advice']}", file=sys.stderr)
                return EXIT_EXPECTATION
    except (PermissionError, ValueError, RuntimeError) as exc:
        raise HarnessError(str(exc)) from None
    return EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from harness.analysis.calibrate import calibrate, render
    run_dir = _run_dir(args)
    result = calibrate(run_dir, args.trial)
    hosts = args.hosts or _run_hosts(run_dir)
    print(json.dumps(asdict(result) | {"simulated": result.simulated_block(hosts)}, indent=2) if args.json
          else render(result, hosts))
    return EXIT_OK


def _run_hosts(run_dir: Path) -> int:
    from harness.store.runstore import open_run
    from harness.store.reads import run_hosts
    store = open_run(run_dir)
    try:
        return run_hosts(store)
    finally:
        store.close()


def _compare(args: argparse.Namespace) -> int:
    from harness.analysis.compare import compare_runs, render_compare
    from harness.analysis.report import find_run
    try:
        run_dirs = [find_run(run, args.results) for run in args.runs]
        result = compare_runs(run_dirs, baseline=args.baseline, min_difference=args.min_difference)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise HarnessError(str(exc).strip("'\"")) from None
    print(json.dumps(result, indent=2, default=str) if args.json else render_compare(result))
    return EXIT_OK


def _crashes(args: argparse.Namespace) -> int:
    from harness.present.crashview import render_bucket, render_buckets
    from harness.analysis.report import build_report
    from harness.present.crashview import bucket_json, buckets_json
    run_dir = _run_dir(args)
    report = build_report(run_dir)
    if args.bucket is None:
        if args.bundle or args.gdb:
            raise HarnessError("--bundle and --gdb need a BUCKET (harness crashes RUN lists them)")
        print(json.dumps(buckets_json(report), indent=2, default=str) if args.json else render_buckets(report))
        return EXIT_OK
    if args.bundle or args.gdb:
        from harness.collect.bundle import open_in_gdb, write_bundle
        from harness.present.crashview import bucket_example
        example = bucket_example(run_dir, args.bucket)
        if example is None:
            raise HarnessError(f"no crash bucket {args.bucket!r} in {run_dir} (harness crashes {run_dir} lists them)")
        if args.gdb:
            return open_in_gdb(run_dir, *example)
        plan = write_bundle(run_dir, *example, args.bundle)
        print(f"{args.bundle}: core, {len(plan.objects)} objects, triage, gdb.cmd"
              + (f"; missing: {'; '.join(plan.missing)}" if plan.missing else ""))
        return EXIT_OK
    text = render_bucket(run_dir, args.bucket)
    if text is not None and args.json:
        text = json.dumps(bucket_json(run_dir, args.bucket), indent=2, default=str)
    if text is None:
        raise HarnessError(f"no crash bucket {args.bucket!r} in {run_dir} (harness crashes {run_dir} lists them)")
    print(text)
    return EXIT_OK


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from harness.store.resume import Invocation
    from harness.run.options import RunOptions
    scenario = load_scenario(args.scenario, duration=args.duration, seed=args.seed)
    args.cluster = _cluster(args)
    if args.trials is not None and args.trials < 1:
        raise HarnessError("--trials must be at least 1")
    from harness.present.prometheus import parse_address
    invocation = Invocation(command=args.command, scenario_base=str(args.scenario.resolve().parent),
                            scenario_file=str(args.scenario), duration=args.duration, seed=args.seed,
                            variant=args.variant, trials=args.trials, baseline=getattr(args, "baseline", None),
                            extra={"rollup_after": args.rollup_after, "rollup_every": args.rollup_every})
    if args.rollup_every < 1 or args.rollup_after < 0:
        raise HarnessError("--rollup-every must be at least 1s and --rollup-after not negative")
    options = RunOptions(out_dir=args.results, variant=args.variant, trials=args.trials, status=not args.quiet,
                         argv=argv, metrics=parse_address(args.metrics) if args.metrics else None,
                         invocation=invocation, rollup_after=args.rollup_after, rollup_every=int(args.rollup_every))
    if args.command == "soak" and args.baseline not in (None, "latest-good"):
        from harness.analysis.regress import find_baseline
        try:   # resolved as at the end of the night: a baseline that will not resolve is an error now, not after
            find_baseline(args.results, scenario.name, args.baseline, exclude=None)
        except HarnessError as exc:
            raise HarnessError(f"--baseline: {exc}") from None
    _say_cut(load_scenario(args.scenario, seed=args.seed) if args.duration is not None else scenario,
             scenario.duration)
    return _execute(scenario, options, args, args.command)


def _say_cut(plan: Any, duration: float) -> None:
    """Before the run: what a duration shorter than the plan leaves out (phases, faults, expectations)."""
    from harness.plan.cut import plan_cut
    for line in plan_cut(plan, duration).lines():
        print(f"harness: note: {line}", file=sys.stderr)


def _resume(args: argparse.Namespace, argv: list[str]) -> int:
    """Finish a run stopped by SIGKILL, a reboot, a full disk or Ctrl-C (docs/soak.md)."""
    from harness.base.safefs import RunLock, Untrusted, check_run_dir
    run_dir = _run_dir(args)
    try:  # resume runs what the folder says, as root: only from a folder nobody else could have changed
        check_run_dir(run_dir)
    except Untrusted as exc:
        raise HarnessError(f"{exc}: refusing to resume it (another user could have planted what it would "
                           f"run)") from None
    lock = RunLock.take(run_dir)   # one owner: a second resume (or the run itself, still going) is refused
    try:
        return _resume_locked(args, argv, run_dir, lock)
    except BaseException:
        lock.release()
        raise


def _resume_locked(args: argparse.Namespace, argv: list[str], run_dir: Path, lock: Any) -> int:
    from harness.scenario.loader import build_scenario
    from harness.store.resume import resume_point
    from harness.run.options import RunOptions
    from harness.base.yamlsource import parse_source
    point = resume_point(run_dir)
    invocation = point.invocation
    where = Path(invocation.scenario_base) / Path(invocation.scenario_file).name
    scenario = build_scenario(parse_source(point.scenario_text, invocation.scenario_file), where,
                              duration_override=invocation.duration, seed_override=invocation.seed)
    if scenario.fleet.simulated is not None:
        raise HarnessError("a simulated run is deterministic and quick: run it again instead of resuming it")
    args.cluster = _cluster(args)
    _say_cut(build_scenario(parse_source(point.scenario_text, invocation.scenario_file), where), scenario.duration)
    from harness.present.prometheus import parse_address
    options = RunOptions(out_dir=run_dir.parent, variant=invocation.variant, trials=invocation.trials,
                         status=not args.quiet, argv=argv, invocation=invocation, resume=point,
                         rollup_after=invocation.extra.get("rollup_after", 3600.0),
                         rollup_every=int(invocation.extra.get("rollup_every", 60)),
                         metrics=parse_address(args.metrics) if args.metrics else None, lock=lock)
    args.baseline = invocation.baseline
    return _execute(scenario, options, args, invocation.command)


def _execute(scenario: Any, options: Any, args: argparse.Namespace, command: str) -> int:
    """Run (or resume) a scenario, judge it, print the report; the exit code is saved in the store."""
    from harness.run.runner import run_scenario
    if scenario.fleet.simulated is not None and args.cluster:
        from harness.cluster.simrun import run_simulation_on_cluster
        result = run_simulation_on_cluster(scenario, options, args.cluster)   # one task per trial
    elif args.cluster:
        from harness.cluster.fleetrun import run_fleet_on_cluster
        result = run_fleet_on_cluster(scenario, options, args.cluster)   # hosts on the workers' machines
    elif scenario.fleet.simulated is not None:
        from harness.sim.run import run_simulation
        result = run_simulation(scenario, options)     # a model fleet in virtual time (docs/simulation.md)
    else:
        from harness.scenario.needs import machine_loss_problem
        resumed_from = options.resumed_from(scenario)
        refused = machine_loss_problem(scenario, resumed_from)   # a local run has no machines to lose
        if refused:
            raise HarnessError(refused + (f": resume it with --cluster (it goes on from {resumed_from}s)"
                                          if resumed_from else ""))
        from harness.run.capacity import rate_warning
        warning = rate_warning(scenario)
        if warning:
            print(f"harness: warning: {warning}", file=sys.stderr)
        result = trio.run(run_scenario, scenario, options)
    try:
        code = _verdict(result, args, soak=command == "soak")
        _record_exit_code(result.run_dir, code)
    finally:
        if result.lock is not None:
            result.lock.release()   # held until the verdict is in the store
    return code


def _record_exit_code(run_dir: Path, code: int) -> None:
    from harness.store.runstore import open_run
    store = open_run(run_dir)
    try:
        store.set_exit_code(code)
    finally:
        store.close()


def _verdict(result: Any, args: argparse.Namespace, soak: bool = False) -> int:
    from harness.analysis.report import render_text
    report, expectations = _judge(result.run_dir)
    regressions = _soak_judgement(result.run_dir, report, args) if soak else None
    _write_junit(args.junit, report, expectations, regressions)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render_text(report, expectations))
        if soak:
            print(_render_soak(report, regressions))
    if args.html and not getattr(result, "forced", False):  # a second Ctrl-C: exit now, `harness report --html` later
        try:
            path = _write_html(result.run_dir, "", report)
            print(f"html report: {path}", file=sys.stderr if args.json else sys.stdout)
        except Exception as exc:  # the page is a view: its failure must not cost the run's verdict
            print(f"harness: warning: the HTML report was not written: {exc}", file=sys.stderr)
    if result.signal is not None:
        return 128 + result.signal
    if result.failed_trials:
        for failed in result.failed_trials:
            print(f"harness: error: {failed}", file=sys.stderr)
        return EXIT_USAGE
    if regressions is not None and regressions.get("failed"):
        return EXIT_EXPECTATION
    return EXIT_EXPECTATION if any(not e["held"] for e in expectations) else EXIT_OK


def _soak_judgement(run_dir: Path, report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """Trends of the night, and what changed against the baseline (added to the report as `trends`
    and `regressions`); None when there is no baseline to compare with."""
    from harness.analysis.regress import compare_to_baseline, find_baseline
    from harness.analysis.trends import run_trends
    report["trends"] = run_trends(run_dir)
    report["regressions"] = None
    if not args.baseline:
        return None
    try:
        baseline = find_baseline(run_dir.parent, report["scenario"], args.baseline, exclude=run_dir)
    except HarnessError as exc:
        if args.baseline != "latest-good":
            raise
        report["baseline_note"] = str(exc)  # the first night has nothing to compare with
        return None
    report["regressions"] = compare_to_baseline(run_dir, baseline)
    return report["regressions"]


def _render_soak(report: dict[str, Any], regressions: dict[str, Any] | None) -> str:
    from harness.analysis.regress import render_regressions
    from harness.analysis.trends import render_trends
    parts = ["", render_trends(report["trends"])]
    if regressions is not None:
        parts += ["", render_regressions(regressions)]
    elif report.get("baseline_note"):
        parts += ["", f"no baseline: {report['baseline_note']}"]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
