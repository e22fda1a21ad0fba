"""Scenario YAML -> Scenario, with every problem reported as file:line: field: message."""

from __future__ import annotations

import difflib
import errno as errno_module
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.base import units
from harness.scenario.claims import METRICS as COMPARE_METRICS, VariantExpectation
from harness.base.errors import Problem, ScenarioError
from harness.base.fields import (
    MISSING, Invalid, Reader, as_argv, as_bool, as_int, as_number, as_positive_int, as_str, as_str_map,
    describe, one_of,
)
from harness.scenario.loadshape import LoadShape, PhaseSpec
from harness.protocols import PROTOCOLS, RequestSpec, codec, parse_pattern
from harness.scenario.model import (
    ALLOCATORS, NET_FAULT_KINDS, RESOURCE_FAULT_KINDS, Client, Cores, Expectation, Fault, Fleet, Group, HostLoss,
    HostSelection, IsolationSpec, Keys, MachineLoss, Ready, Restart, Scenario, SetupStep, ShimFault, Target, Variant,
    Window,
)
from harness.base.yamlsource import UNREADABLE, PathKey, Source, parse_source, problem, read_text

TOP_KEYS = {"name", "description", "seed", "duration", "target", "fleet", "load", "client", "faults", "cores",
            "variants", "trials", "expect"}
TEMPLATE_FIELDS = {"port", "host", "index", "dir", "root", "addr"}
BACKEND_FIELDS = {"backends", "backend.name", "backend.host", "backend.addr", "backend.port", "backend.index",
                  "backend.group"}   # a group with backends: (harness/run/faults/network/topology.py)
LOCK_ERRNOS = ("EDEADLK", "EAGAIN", "EBUSY", "EINVAL", "EOWNERDEAD", "ETIMEDOUT", "EPERM")
ALLOC_FUNCTIONS = ("malloc", "calloc", "realloc", "reallocarray", "posix_memalign", "aligned_alloc",
                   "memalign", "valloc", "operator new")
LOCK_FUNCTIONS = ("pthread_mutex_lock", "pthread_mutex_trylock", "pthread_mutex_timedlock",
                  "pthread_rwlock_rdlock", "pthread_rwlock_wrlock", "pthread_rwlock_tryrdlock",
                  "pthread_rwlock_trywrlock")
# Where keys go that people write one level off (hosts: 8 at the top instead of under fleet:).
ELSEWHERE = {"hosts": "fleet.hosts", "balancer": "fleet.balancer", "command": "target.command",
             "build": "target.build", "protocol": "target.protocol", "ready": "target.ready",
             "restart": "target.restart", "env": "target.env", "timeout": "client.timeout",
             "connections": "client.connections", "keys": "client.keys", "phases": "load",
             "fault": "faults", "variant": "variants", "expectations": "expect", "expects": "expect"}
MAX_STEPS = 10_000
MAX_ZIPF_KEYS = 2_000_000
LATENCY_METRICS = ("p50_latency", "p90_latency", "p99_latency", "p999_latency", "max_latency")
EXPECT_METRICS = ("crashes", "error_rate", "timeout_rate", "throughput", "hosts_alive") + LATENCY_METRICS
REQUEST_METRICS = ("error_rate", "timeout_rate", "throughput") + LATENCY_METRICS   # may name a request


def load_scenario(path: Path | str, *, duration: float | None = None, seed: int | None = None) -> Scenario:
    """Load and validate; raises ScenarioError listing every problem found."""
    source = parse_source(read_text(Path(path)), str(path))
    return build_scenario(source, Path(path), duration_override=duration, seed_override=seed)


def load_scenario_text(text: str, file: str = "<scenario>", base: Path | None = None) -> Scenario:
    """Validate scenario text; relative paths (target.root) resolve against `base` (default: file's folder)."""
    return build_scenario(parse_source(text, file), Path(file) if base is None else base / "scenario.yaml")


def build_scenario(source: Source, path: Path, *, duration_override: float | None = None,
                   seed_override: int | None = None) -> Scenario:
    problems: list[Problem] = list(source.problems)
    if source.data is None:
        raise _error(problems or [Problem(source.file, 1, "(document)", "the scenario is empty")])
    # Top-level keys starting with "x-" are free for the user (a place for YAML anchors, like compose files).
    extensions = {key for key in source.data if isinstance(key, str) and key.startswith("x-")} \
        if isinstance(source.data, dict) else set()
    top = Reader(source, (), source.data, problems, TOP_KEYS | extensions, what="a scenario mapping",
                 elsewhere=ELSEWHERE)
    if not top.ok:
        raise _error(problems)

    name = top.get("name", as_str, required=True, default=None)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        top.problem(("name",), "use letters, digits, '.', '_' and '-' only (it names the results folder)")
    seed = top.get("seed", as_int, default=1)
    duration = top.get("duration", _positive_duration, default=None)
    if duration_override is not None:
        if not duration_override > 0 or duration_override == float("inf"):
            top.problem(("duration",), f"the duration given on the command line must be greater than zero, "
                                       f"got {duration_override:g}s")
        else:
            duration = duration_override
    group_names = _group_names(top)
    target = _target(top, path, command_required=group_names is None)   # with groups, each group may give it
    fleet = _fleet(top, target)
    load = _load(top, duration)
    client = _client(top)
    cores = _cores(top)
    faults = _faults(top, fleet, group_names)
    variants = _variants(top, fleet, group_names)
    trials = top.get("trials", as_positive_int, default=1)
    # Phase names are checked against the load as written too: a shorter --duration that cuts a phase
    # off does not make the scenario invalid (that expectation just has no data in such a run).
    written = LoadShape.build(list(load.specs)) if load is not None and duration_override is not None else None
    expect = _expectations(top, load, variants, written, target)
    compare_expect = _compare_expectations(top, variants)
    if not problems and (target is None or fleet is None or load is None):  # each None has a problem; be sure
        top.problem((), "the scenario needs target, fleet and load")
    if problems:
        raise _error(problems)
    assert name is not None and target is not None and fleet is not None and load is not None
    return Scenario(
        name=name, file=source.file, text=source.text or _text_of(path),
        seed=seed if seed_override is None else seed_override,
        load=load, target=target, fleet=fleet, client=client, faults=tuple(faults), variants=tuple(variants),
        trials=trials, expect=tuple(expect), description=top.get("description", as_str, default=""), cores=cores,
        compare_expect=tuple(compare_expect),
    )


def _error(problems: list[Problem]) -> ScenarioError:
    """All problems, in the order of the file (stable: same-line problems keep their order)."""
    return ScenarioError(sorted(problems, key=lambda p: p.line))


def _text_of(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return ""


# --- scalar parsers with units ----------------------------------------------------------------

def _positive_duration(value: Any) -> float:
    seconds = units.parse_duration(value)
    if seconds <= 0:
        raise Invalid(f"expected a duration greater than zero, got {describe(value)}")
    return seconds


def _duration(value: Any) -> float:
    return units.parse_duration(value)


MAX_STOP_GRACE = 300.0   # a target that needs longer to stop is killed; a second Ctrl-C does it at once


def _stop_grace(value: Any) -> float:
    seconds = units.parse_duration(value)
    if seconds > MAX_STOP_GRACE:
        raise Invalid(f"at most {units.format_duration(MAX_STOP_GRACE)} (a target still running then gets SIGKILL), "
                      f"got {describe(value)}")
    return seconds


def _templates_ok(reader: Reader, key: str | PathKey, argv: tuple[str, ...] | list[str] | str | None) -> None:
    """Every {placeholder} in these strings must be one the fleet fills in."""
    if not argv:
        return
    sub = (key,) if isinstance(key, str) else key
    for arg in [argv] if isinstance(argv, str) else argv:
        for match in re.finditer(r"\{([^{}]*)\}", arg):
            if match.group(1) not in TEMPLATE_FIELDS | BACKEND_FIELDS:
                reader.problem(sub, f"unknown placeholder '{{{match.group(1)}}}' in {arg!r} "
                                    f"(known: {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))}, and "
                                    f"{{backends}} {{backend.port}}... in a group with backends)")


# --- sections -----------------------------------------------------------------------------------

TARGET_KEYS = {"root", "build", "command", "protocol", "request", "requests", "terminator", "expect_reply",
               "expect_status", "value_size", "setup", "files", "ready", "restart", "env", "cwd", "stop_grace",
               "log_max", "isolation"}
# What a fleet group may set for its own hosts; the rest of the target is the client's side, shared by
# every host behind the one balancer (one request stream, one terminator).
GROUP_OVERRIDES = {"build", "command", "env", "ready", "restart", "expect_reply", "setup", "files", "cwd",
                   "stop_grace", "log_max", "isolation"}
FLEET_WIDE = {"root", "protocol", "request", "requests", "terminator", "expect_status", "value_size"}
REQUEST_KEYS = {"name", "weight", "request", "expect", "expect_status", "value_size"}
DEFAULT_REQUESTS = {"line": "GET {key}\n", "http": "GET /", "resp": ["GET", "{key}"], "memcached": "get {key}\r\n"}
MAX_REAL_HOSTS = 512
MAX_VALUE_SIZE = 64 * 1024 * 1024
MAX_SETUP = 10_000_000


def _target(top: Reader, path: Path, command_required: bool = True) -> Target | None:
    r = top.child("target", TARGET_KEYS, required=True)
    if not r.ok:
        return None
    root_text = r.get("root", as_str, default=".")
    try:
        root = (path.parent / root_text).resolve()
    except (OSError, ValueError) as exc:
        r.problem(("root",), f"not a usable path: {exc}")
        root = path.parent
    if command_required and not r.has("command") and "command" not in r.misspelt:
        r.problem(("command",), "missing required field 'command'")
    protocol = r.get("protocol", one_of(*PROTOCOLS), default="line")
    if r.has("terminator") and protocol != "line":
        r.problem(("terminator",), f"only the line protocol has a terminator; {protocol} replies end by its rules")
    if r.has("expect_status") and protocol != "http":
        r.problem(("expect_status",), f"expect_status is for http; for {protocol} write expect_reply")
    if r.has("expect_reply") and protocol == "http":
        r.problem(("expect_reply",), "for http, write expect_status (like 2xx, [200, 304] or 200-399)")
    value_size = r.get("value_size", _value_size, default=0)
    expect_status = r.get("expect_status", _protocol_expect("http"), default=None) if protocol == "http" else None
    requests = _requests(r, protocol, value_size, expect_status)
    terminator = r.get("terminator", as_str, default="\n")
    base = Target(root=root, command=("?",), protocol=protocol, requests=requests, terminator=terminator)
    return _host_settings(r, base)


def _value_size(value: Any) -> int:
    size = units.parse_size(value) if isinstance(value, str) else as_int(value)
    if not 0 <= size <= MAX_VALUE_SIZE:
        raise Invalid(f"expected a size from 0 to {MAX_VALUE_SIZE // 2**20}MiB, got {describe(value)}")
    return size


def _protocol_expect(protocol: str) -> Any:
    module = codec(protocol)
    return module.parse_expect


def _check_name(r: Reader, name: str | None, taken: set[str], what: str, use: str = "") -> None:
    """A request's or a group's name: a letter first, then letters, digits, '.', '_' and '-'; used once."""
    if name is not None and not GROUP_NAME.fullmatch(name):
        r.problem(("name",), f"a {what} name starts with a letter and uses letters, digits, '.', '_' and '-'{use}, "
                             f"got {name!r}")
    elif name is not None and name in taken:
        r.problem(("name",), f"{what} name {name!r} is used twice")


def _requests(r: Reader, protocol: str, value_size: int, expect_status: Any) -> tuple[RequestSpec, ...]:
    """`request:` (one) or `requests:` (a mix by weight), each template checked by its protocol's codec."""
    module = codec(protocol)
    default_expect = expect_status if protocol == "http" else None
    if r.has("request") and r.has("requests"):
        r.problem(("requests",), "give either request (one) or requests (a mix), not both")
    if not r.has("requests"):
        template = r.get("request", module.parse_request, default=None)
        if template is None and not r.has("request"):
            template = module.parse_request(DEFAULT_REQUESTS[protocol])
        if template is None:
            return ()
        if default_expect is None and protocol == "http":
            default_expect = module.parse_expect(None)
        return (RequestSpec("default", template, default_expect, value_size=value_size),)
    items = r.items("requests")
    if r.data.get("requests") == []:
        r.problem(("requests",), "expected at least one request, like [{name: get, weight: 90, request: ...}]")
    specs: list[RequestSpec] = []
    for item_path, item in items:
        q = Reader(r.source, item_path, item, r.problems, REQUEST_KEYS,
                   what="a request like {name: get, weight: 90, request: ...}")
        if not q.ok:
            continue
        name = q.get("name", as_str, required=True, default=None)
        _check_name(q, name, {s.name for s in specs}, "request")
        weight = q.get("weight", as_number, default=1.0)
        if not weight > 0:
            q.problem(("weight",), f"expected a weight greater than zero, got {weight:g}")
        template = q.get("request", module.parse_request, required=True, default=None)
        expect = _request_expect(q, protocol, default_expect)
        size = q.get("value_size", _value_size, default=value_size)
        if name is not None and template is not None:
            specs.append(RequestSpec(name, template, expect, weight=weight, value_size=size))
    return tuple(specs)


def _request_expect(q: Reader, protocol: str, default: Any) -> Any:
    module = codec(protocol)
    if protocol == "http":
        if q.has("expect"):
            q.problem(("expect",), "for http, write expect_status (like 2xx, [200, 304] or 200-399)")
        return q.get("expect_status", module.parse_expect, default=default or module.parse_expect(None))
    if q.has("expect_status"):
        q.problem(("expect_status",), f"expect_status is for http; for {protocol} write expect")
    return q.get("expect", module.parse_expect, default=None)


def _host_settings(r: Reader, base: Target) -> Target:
    """The settings a host runs with (command, build, env, ready, restart...), each defaulting to `base`'s:
    read for the target itself, and again for each fleet group over the target. env, ready and restart
    merge key by key (a group's `restart: {backoff: 2s}` keeps the target's policy)."""
    command = r.get("command", as_argv, default=base.command)
    _templates_ok(r, "command", command)
    expect_reply = r.get("expect_reply", as_str, default=base.expect_reply)
    if expect_reply is not None and r.has("expect_reply"):
        try:
            parse_pattern(expect_reply)
        except Invalid as exc:
            r.problem(("expect_reply",), str(exc))
    ready = _ready(r, base)
    setup = _setup(r, base) if r.has("setup") else base.setup
    files = _files(r, base.root) if r.has("files") else base.files
    restart_r = r.child("restart", {"policy", "backoff", "max_backoff", "reset_after"})
    restart = Restart(
        policy=restart_r.get("policy", one_of("always", "on-failure", "never"), default=base.restart.policy),
        backoff=restart_r.get("backoff", _duration, default=base.restart.backoff),
        max_backoff=restart_r.get("max_backoff", _duration, default=base.restart.max_backoff),
        reset_after=restart_r.get("reset_after", _duration, default=base.restart.reset_after),
    )
    env = r.get("env", as_str_map, default={})
    for name, value in env.items():
        _templates_ok(r, ("env", name), value)
    cwd = r.get("cwd", as_str, default=base.cwd)
    if r.has("cwd"):
        _templates_ok(r, "cwd", cwd)
    return replace(
        base, command=command, build=r.get("build", as_argv, default=base.build), expect_reply=expect_reply,
        ready=ready, restart=restart, env={**base.env, **env}, cwd=cwd, setup=setup, files=files,
        stop_grace=r.get("stop_grace", _stop_grace, default=base.stop_grace),
        log_max=r.get("log_max", units.parse_size, default=base.log_max),
        isolation=r.get("isolation", _isolation, default=base.isolation),
    )


ISOLATION_WORDS = ("pid", "cgroup", "netns")


def _isolation(value: Any) -> IsolationSpec:
    """isolation: auto (default: a PID namespace and a cgroup where the machine allows) | none | a list of
    pid, cgroup, netns (exactly those, each required)."""
    if value == "auto":
        return IsolationSpec()
    if value == "none":
        return IsolationSpec(pid=False, cgroup=False)
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        raise Invalid(f"expected auto, none, or a list of {', '.join(ISOLATION_WORDS)}, got {describe(value)}")
    for word in words:
        if word not in ISOLATION_WORDS:
            hint = difflib.get_close_matches(word, ISOLATION_WORDS, n=1)
            raise Invalid(f"unknown isolation {word!r}" + (f" (did you mean '{hint[0]}'?)" if hint else
                          f" (expected auto, none, or a list of {', '.join(ISOLATION_WORDS)})"))
    return IsolationSpec(pid="pid" in words, cgroup="cgroup" in words, netns="netns" in words)


def _ready(r: Reader, base: Target) -> Ready:
    """ready: {tcp: PORT} (accepts connections), {request: ..., expect: ...} (a good reply in the target's
    protocol) or {http: /path, status: 200}; each with timeout and interval."""
    q = r.child("ready", {"tcp", "http", "status", "request", "expect", "timeout", "interval"})
    protocol, probe = base.ready.protocol, base.ready.probe
    if q.has("http") and q.has("request"):
        q.problem(("http",), "give either http (a path) or request (in the target's protocol), not both")
    elif q.has("http"):
        if q.has("expect"):
            q.problem(("expect",), "an http readiness probe checks status:, not expect:")
        path = q.get("http", as_str, default="/")
        http = codec("http")
        try:
            template = http.parse_request({"method": "GET", "path": path})
        except Invalid as exc:
            q.problem(("http",), str(exc))
            template = http.parse_request("GET /")
        expect = q.get("status", http.parse_expect, default=http.parse_expect("2xx"))
        protocol, probe = "http", RequestSpec("ready", template, expect)
    elif q.has("request"):
        if q.has("status"):
            q.problem(("status",), "status: goes with an http probe ({http: /health, status: 200})")
        module = codec(base.protocol)
        template = q.get("request", module.parse_request, default=None)
        if template is not None:
            expect = q.get("expect", module.parse_expect, default=None) if base.protocol != "http" else \
                q.get("expect", module.parse_expect, default=module.parse_expect(None))
            protocol, probe = base.protocol, RequestSpec("ready", template, expect)
    else:
        for key in ("status", "expect"):
            if q.has(key):
                q.problem((key,), f"{key}: goes with a probe request (ready: {{request: ...}} or {{http: /path}})")
    return Ready(port=q.get("tcp", _ready_port, default=base.ready.port),
                 timeout=q.get("timeout", _positive_duration, default=base.ready.timeout),
                 interval=q.get("interval", _positive_duration, default=base.ready.interval),
                 protocol=protocol, probe=probe)


def _setup(r: Reader, base: Target) -> tuple[SetupStep, ...]:
    """setup: [{request: ..., keys: all | count: N, expect: ...}] sent to every incarnation before load."""
    module = codec(base.protocol)
    steps: list[SetupStep] = []
    if r.data.get("setup") not in (None, []) and not isinstance(r.data.get("setup"), list):
        r.problem(("setup",), "expected a list of requests like [{request: ..., keys: all}]")
        return ()
    for item_path, item in r.items("setup"):
        q = Reader(r.source, item_path, item, r.problems, {"request", "keys", "count", "expect", "expect_status",
                                                            "value_size"},
                   what="a set-up request like {request: ..., keys: all} or {request: ..., count: 100}")
        if not q.ok:
            continue
        template = q.get("request", module.parse_request, required=True, default=None)
        if q.has("keys") and q.has("count"):
            q.problem(("count",), "give either keys: all (every key of client.keys once) or count: N, not both")
        all_keys = q.get("keys", one_of("all"), default=None) == "all"
        count = q.get("count", as_positive_int, default=1)
        if count > MAX_SETUP:
            q.problem(("count",), f"at most {MAX_SETUP} set-up requests per step, got {count}")
        expect = _request_expect(q, base.protocol, base.requests[0].expect if base.protocol == "http" and
                                 base.requests else None)
        size = q.get("value_size", _value_size, default=base.requests[0].value_size if base.requests else 0)
        if template is not None:
            steps.append(SetupStep(RequestSpec("setup", template, expect, value_size=size), count=count,
                                   all_keys=all_keys))
    return tuple(steps)


def _files(r: Reader, root: Path) -> tuple[tuple[str, str], ...]:
    """files: {name-in-the-host-folder: template-file}: rendered with the host's placeholders at start."""
    value = r.data.get("files")
    if not isinstance(value, dict) or not value:
        r.problem(("files",), "expected a mapping like {nginx.conf: configs/nginx.conf}")
        return ()
    result = []
    for name, source in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            r.problem(("files", str(name)), "a file name in the host's folder: letters, digits, '.', '_', '-' "
                                            "(no folders)")
            continue
        if not isinstance(source, str) or not source:
            r.problem(("files", name), f"expected the path of a template file, got {describe(source)}")
            continue
        if not (root / source).is_file():
            r.problem(("files", name), f"no such file: {root / source}")
            continue
        result.append((name, source))
    return tuple(result)


def _ready_port(value: Any) -> str:
    """ready.tcp: a port number or "{port}" (the port the harness gives each host)."""
    if isinstance(value, str) and value.strip() == "{port}":
        return "{port}"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Invalid(f"expected a TCP port (1-65535) or \"{{port}}\", got {describe(value)}")
    return str(value)


def _fleet(top: Reader, target: Target | None) -> Fleet | None:
    r = top.child("fleet", {"hosts", "balancer", "simulated", "groups", "placement"}, required=True)
    if not r.ok:
        return None
    balancer = r.get("balancer", one_of("round-robin", "least-loaded"), default="least-loaded")
    if r.has("simulated"):
        if r.has("groups"):
            r.problem(("groups",), "groups are for real fleets; a simulated fleet models one kind of host")
        if r.has("placement"):
            r.problem(("placement",), "placement is for real fleets over --cluster (a simulated fleet's "
                                      "hosts are a model, not processes)")
        model = _simulated(r)
        if model is None:
            return None
        _simulated_variants(top, model)
        return Fleet(hosts=model.hosts, balancer=balancer, simulated=model)
    groups = _groups(r, target) if r.has("groups") else ()
    total = sum(group.hosts for group in groups)
    hosts = r.get("hosts", as_positive_int, required=not r.has("groups"), default=total or 1)
    if groups and r.has("hosts") and hosts != total:
        counts = " + ".join(f"{group.hosts} {group.name}" for group in groups)
        r.problem(("hosts",), f"{hosts} hosts, but the groups add up to {total} ({counts}): "
                              f"drop fleet.hosts or make them agree")
    if groups:
        hosts = total
    if hosts > MAX_REAL_HOSTS:
        r.problem(("groups",) if groups and not r.has("hosts") else ("hosts",),
                  f"{hosts} real hosts is more than one machine can run (at most {MAX_REAL_HOSTS})")
    return Fleet(hosts=hosts, balancer=balancer, groups=groups,
                 placement=r.get("placement", one_of(*PLACEMENTS), default="spread"))


GROUP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
PLACEMENTS = ("spread", "pack")    # how hosts go over --cluster machines (harness.plan.placement)


def _groups(fleet: Reader, target: Target | None) -> tuple[Group, ...]:
    """fleet.groups: [{name, hosts, <overrides of the target>}], hosts numbered in this order."""
    items = fleet.items("groups")
    if fleet.data.get("groups") is None or fleet.data.get("groups") == []:
        fleet.problem(("groups",), "expected at least one group, like [{name: estats, hosts: 2, command: [...]}]")
    base = target or Target(root=Path("."), command=("?",))
    groups: list[Group] = []
    for path, item in items:
        r = Reader(fleet.source, path, item, fleet.problems,
                   {"name", "hosts", "backends", "rotation", "placement"} | GROUP_OVERRIDES | FLEET_WIDE,
                   what="a group like {name: estats, hosts: 2, command: [...]}")
        if not r.ok:
            continue
        for key in sorted(FLEET_WIDE & set(r.data)):
            r.problem((key,), f"'{key}' is shared by the whole fleet (one balancer, one request stream): "
                              f"set it once in target.{key}")
        name = r.get("name", as_str, required=True, default=None)
        _check_name(r, name, {group.name for group in groups}, "group",
                    f" (it names the hosts: {name}-0, {name}-1...)")
        hosts = r.get("hosts", as_positive_int, required=True, default=None)
        settings = _host_settings(r, base)
        if settings.command == ("?",) and target is not None and not r.has("command") \
                and "command" not in r.misspelt:
            r.problem((), f"group {name or '?'} has no command: give it here or in target.command")
        backends = _groups_field(r, _names_of(fleet), "backends", key="backends")
        if name is not None and name in backends:
            r.problem(("backends",), f"group {name} cannot be its own backend")
        if backends and settings.isolation.netns:
            r.problem(("isolation",), "a group with backends cannot be in network namespaces of its own (it reaches "
                                      "its backends on 127.0.0.1, through the fault proxy)")
        _backend_placeholders(r, settings, backends)
        if name is not None and hosts is not None:
            groups.append(Group(name=name, hosts=hosts, target=settings, backends=backends,
                                rotation=r.get("rotation", as_bool, default=None),  # type: ignore[arg-type]
                                placement=r.get("placement", one_of(*PLACEMENTS), default=None)))
    # A group that another group names as its backend gets its traffic from there, not from the driver.
    behind = {b for g in groups for b in g.backends}
    groups = [replace(g, rotation=g.name not in behind if g.rotation is None else g.rotation) for g in groups]
    if groups and not any(g.rotation for g in groups):
        fleet.problem(("groups",), "no group gets load from the driver: every group is a backend or has "
                                   "rotation: false (set rotation: true on the front group)")
    return tuple(groups)


def _names_of(fleet: Reader) -> set[str]:
    value = fleet.data.get("groups")
    return {g["name"] for g in value if isinstance(g, dict) and isinstance(g.get("name"), str)} \
        if isinstance(value, list) else set()


def _backend_placeholders(r: Reader, settings: Target, backends: tuple[str, ...]) -> None:
    """{backends} and {backend.*} only mean something in a group that has backends."""
    if backends:
        return
    for arg in settings.command:
        for match in re.finditer(r"\{([^{}]*)\}", arg):
            if match.group(1) in BACKEND_FIELDS:
                r.problem(("command",), f"'{{{match.group(1)}}}' in {arg!r} needs backends: (a group this one "
                                        f"sends traffic to, like backends: api)")
                return


def _group_names(top: Reader) -> set[str] | None:
    """The fleet's group names as written (None: the fleet has no groups), for faults and variants."""
    fleet = top.data.get("fleet")
    if not isinstance(fleet, dict) or not isinstance(fleet.get("groups"), list):
        return None
    return {g["name"] for g in fleet["groups"] if isinstance(g, dict) and isinstance(g.get("name"), str)}


def _groups_field(r: Reader, names: set[str] | None, what: str, key: str = "groups") -> tuple[str, ...]:
    """`groups: estats` or `groups: [estats, arena]`: names of fleet groups, each checked."""
    if not r.has(key):
        return ()
    value = r.data[key]
    chosen = [value] if isinstance(value, str) else value
    if not isinstance(chosen, list) or not chosen or not all(isinstance(n, str) and n for n in chosen):
        r.problem((key,), f"expected a group name or a list of them, got {describe(value)}")
        return ()
    if names is None:
        r.problem((key,), f"the fleet has no groups (fleet.groups) for {what} to choose from")
        return ()
    for name in chosen:
        if name not in names:
            hint = difflib.get_close_matches(name, sorted(names), n=1)
            r.problem((key,), f"no fleet group named {name!r}" + (f" (did you mean '{hint[0]}'?)" if hint else
                              f" (groups: {', '.join(sorted(names))})"))
    if len(set(chosen)) != len(chosen):
        r.problem((key,), "a group is named twice")
    return tuple(dict.fromkeys(chosen))


def _simulated(fleet: Reader) -> "SimModel | None":
    """fleet.simulated: the per-host model (harness.scenario.simparams lists the keys; docs/simulation.md)."""
    from harness.scenario.model import SimModel
    from harness.scenario import simparams as params
    r = fleet.child("simulated", params.TOP)
    if not r.ok:
        return None
    values: dict[str, Any] = {}
    if fleet.has("hosts"):
        if r.has("hosts"):
            fleet.problem(("hosts",), "give the number of hosts once: in simulated.hosts")
        else:
            values["hosts"] = fleet.get("hosts", lambda v: params.parse("hosts", v), default=None)
    for key in sorted(params.TOP, key=lambda k: (k in params.SECTIONS, k)):
        if key in params.SECTIONS:
            section = r.child(key, params.SECTIONS[key])
            for name in sorted(params.SECTIONS[key]):
                dotted = f"{key}.{name}"
                value = section.get(name, lambda v, d=dotted: params.parse(d, v), default=MISSING)
                if value is not MISSING:
                    values[dotted] = value
        else:
            value = r.get(key, lambda v, k=key: params.parse(k, v), default=MISSING)
            if value is not MISSING:
                values[key] = value
    missing = [key for key in params.REQUIRED if values.get(key) is None]
    for key in missing:
        if key not in r.misspelt and not (key == "hosts" and fleet.has("hosts")):
            r.problem((key,), f"missing required field '{key}'")
    if missing:
        return None
    model = SimModel(**{params.FIELDS[key][0]: value for key, value in values.items()})
    for key, message in params.check(model):
        r.problem(tuple(key.split(".")), message)
    return model


def _simulated_variants(top: Reader, model: "SimModel") -> None:
    """In a simulated fleet a variant's args override model fields: {hosts: 800, memory.budget: 64MiB}."""
    from harness.scenario import simparams as params
    for index, (path, item) in enumerate(top.items("variants")):
        if not isinstance(item, dict) or not isinstance(item.get("args"), dict):
            continue
        changes: dict[str, str] = {}
        for key, value in item["args"].items():
            if str(key) not in params.FIELDS:
                hint = difflib.get_close_matches(str(key), list(params.FIELDS), n=1)
                _at(top, path + ("args", key), f"unknown simulated-model key {key!r} in a simulated fleet's "
                                               f"variant" + (f" (did you mean '{hint[0]}'?)" if hint else
                                                             f" (known: {', '.join(params.FIELDS)})"))
                continue
            try:
                params.parse(str(key), value if not isinstance(value, bool) else str(value).lower())
                changes[str(key)] = value
            except (ValueError, ArithmeticError) as exc:
                _at(top, path + ("args", key), str(exc))
        try:
            changed = params.override(model, changes)
        except (ValueError, ArithmeticError):
            continue
        for key, message in params.check(changed):
            _at(top, path + ("args",), f"{key}: {message}")


_PHASE_KEYS = {
    "ramp": {"from", "to", "over", "name"},
    "hold": {"for", "rate", "name"},
    "spike": {"factor", "to", "for", "name"},
    "steps": {"from", "to", "count", "each", "name"},
}


def _load(top: Reader, duration: float | None) -> LoadShape | None:
    if not top.has("load"):
        if "load" not in top.misspelt:
            top.problem(("load",), "missing required section 'load'")
        return None
    specs: list[PhaseSpec] = []
    items = top.items("load")
    if top.data.get("load") is UNREADABLE:
        return None
    if top.data.get("load") is None or (isinstance(top.data.get("load"), list) and not items):
        top.problem(("load",), "the load needs at least one phase, like [{hold: {for: 30s, rate: 100}}]")
    for path, item in items:
        if not isinstance(item, dict) or len(item) != 1:
            _at(top, path, f"each phase is one of {', '.join(_PHASE_KEYS)} with its settings, "
                           f"like {{hold: {{for: 30s}}}}; got {describe(item)}")
            continue
        kind, body = next(iter(item.items()))
        if kind not in _PHASE_KEYS:
            hint = difflib.get_close_matches(kind, list(_PHASE_KEYS), n=1)
            _at(top, path + (kind,), f"unknown phase '{kind}'" + (f" (did you mean '{hint[0]}'?)" if hint else
                                     f" (expected one of: {', '.join(_PHASE_KEYS)})"))
            continue
        r = Reader(top.source, path + (kind,), body, top.problems, _PHASE_KEYS[kind])
        if not r.ok:
            continue
        name = r.get("name", as_str, default=None)
        if kind == "ramp":
            specs.append(PhaseSpec("ramp", name, r.get("over", _positive_duration, required=True, default=0.0),
                                   rate_from=r.get("from", units.parse_rate, default=None),
                                   rate_to=r.get("to", units.parse_rate, required=True, default=0.0)))
        elif kind == "hold":
            specs.append(PhaseSpec("hold", name, r.get("for", _positive_duration, required=True, default=0.0),
                                   rate_to=r.get("rate", units.parse_rate, default=None)))
        elif kind == "spike":
            if r.has("factor") == r.has("to"):
                r.problem((), "a spike needs exactly one of 'factor' (x current rate) or 'to' (a rate)")
            factor = r.get("factor", as_number, default=None)
            if factor is not None and factor < 0:
                r.problem(("factor",), f"factor must not be negative, got {factor}")
            specs.append(PhaseSpec("spike", name, r.get("for", _positive_duration, required=True, default=0.0),
                                   factor=factor, rate_to=r.get("to", units.parse_rate, default=None)))
        else:
            count = r.get("count", as_positive_int, required=True, default=1)
            if count > MAX_STEPS:
                r.problem(("count",), f"at most {MAX_STEPS} steps, got {count}")
                count = 1
            specs.append(PhaseSpec("steps", name, r.get("each", _positive_duration, required=True, default=0.0),
                                   rate_from=r.get("from", units.parse_rate, default=None),
                                   rate_to=r.get("to", units.parse_rate, required=True, default=0.0),
                                   count=count))
    if not specs:
        return None
    return LoadShape.build(specs, duration)


def _cores(top: Reader) -> Cores:
    r = top.child("cores", {"max_size", "keep_per_bucket", "sample_every", "disk_cap", "compress", "min_free"})
    defaults = Cores()
    return Cores(max_size=r.get("max_size", units.parse_size, default=defaults.max_size),
                 keep_per_bucket=r.get("keep_per_bucket", lambda v: max(0, as_int(v)), default=defaults.keep_per_bucket),
                 sample_every=r.get("sample_every", as_positive_int, default=defaults.sample_every),
                 disk_cap=r.get("disk_cap", units.parse_size, default=defaults.disk_cap),
                 compress=r.get("compress", as_bool, default=defaults.compress),
                 min_free=r.get("min_free", units.parse_size, default=defaults.min_free))


def _client(top: Reader) -> Client:
    r = top.child("client", {"timeout", "connections", "probe_interval", "keys", "workers", "load_from"})
    keys_r = r.child("keys", {"space", "distribution", "zipf_s"})
    keys = Keys(
        space=keys_r.get("space", as_positive_int, default=10000),
        distribution=keys_r.get("distribution", one_of("uniform", "zipf"), default="uniform"),
        zipf_s=keys_r.get("zipf_s", as_number, default=1.1),
    )
    if keys.zipf_s <= 0:
        keys_r.problem(("zipf_s",), f"the Zipf exponent must be greater than 0, got {keys.zipf_s:g}")
        keys = Keys(keys.space, keys.distribution)
    if keys.distribution == "zipf" and keys.space > MAX_ZIPF_KEYS:
        keys_r.problem(("space",), f"a zipf key space holds at most {MAX_ZIPF_KEYS} keys, got {keys.space}")
    connections = r.get("connections", as_positive_int, default=2)
    if connections > 64:
        r.problem(("connections",), f"at most 64 connections per host, got {connections}")
    return Client(timeout=r.get("timeout", _positive_duration, default=1.0), connections=connections,
                  probe_interval=r.get("probe_interval", _positive_duration, default=0.25), keys=keys,
                  workers=r.get("workers", _workers, default=1),
                  load_from=r.get("load_from", one_of("machines", "command"), default="machines"))


MAX_DRIVER_WORKERS = 64


def _workers(value: Any) -> int | str:
    """client.workers: how many driver processes send the load (`auto`: one per usable core)."""
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        raise Invalid(f"expected a number of driver processes or auto, got {describe(value)}")
    number = as_positive_int(value)
    if number > MAX_DRIVER_WORKERS:
        raise Invalid(f"at most {MAX_DRIVER_WORKERS} driver workers, got {number}")
    return number


def _hosts_selection(r: Reader, fleet_size: int, where: str = "the fleet has") -> HostSelection:
    if not r.has("hosts"):
        return HostSelection()
    value = r.data["hosts"]
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return HostSelection(fraction=units.parse_fraction(value))
        except ValueError as exc:
            r.problem(("hosts",), str(exc))
            return HostSelection()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        if value > fleet_size:
            r.problem(("hosts",), f"{value} hosts asked but {where} {fleet_size}")
        return HostSelection(count=value)
    if value == "all":
        return HostSelection()
    r.problem(("hosts",), f"expected a number of hosts (at least 1), a percentage like '25%' or 'all', "
                          f"got {describe(value)}")
    return HostSelection()


FAULT_KINDS = ["host-loss", "alloc-fail", "lock-error", *NET_FAULT_KINDS, *RESOURCE_FAULT_KINDS, "machine-loss"]
_WINDOW_KEYS = {"from", "until", "every", "for"}
_SHIM_COMMON = {"kind", "mode", "hosts", "groups", "probability", "nth", "after", "times", "callers"} | _WINDOW_KEYS


def _faults(top: Reader, fleet: Fleet | None, group_names: set[str] | None) -> list[Fault]:
    fleet_size = fleet.hosts if fleet else 1
    faults: list[Fault] = []
    for index, (path, item) in enumerate(top.items("faults")):
        if not isinstance(item, dict):
            _at(top, path, f"expected a mapping like {{kind: host-loss, at: 30s}}, got {describe(item)}")
            continue
        if "kind" not in item:
            _at(top, path + ("kind",), f"missing required field 'kind' ({', '.join(FAULT_KINDS)})")
            continue
        kind = item["kind"]
        fault: Fault | None
        if kind == "host-loss":
            r = Reader(top.source, path, item, top.problems,
                       {"kind", "at", "how", "hosts", "down_for", "groups"} | _WINDOW_KEYS)
            if r.has("groups"):  # not yet: its hosts are picked among every host up at that moment
                r.problem(("groups",), "a host-loss picks among the whole fleet; 'groups' is for alloc-fail "
                                       "and lock-error")
            fault = _host_loss(r, index, fleet_size)
        elif kind in ("alloc-fail", "lock-error"):
            extra = {"budget", "spread", "min_size", "max_size", "function", "functions"} if kind == "alloc-fail" else \
                {"errno", "function", "functions"}
            r = Reader(top.source, path, item, top.problems, _SHIM_COMMON | extra)
            groups = _groups_field(r, group_names, "a fault")
            fault = _shim_fault(r, index, kind, _pool_size(fleet, groups), groups)
            if fault is not None:
                _check_shim_fault(r, fault)
        elif kind in NET_FAULT_KINDS or kind in RESOURCE_FAULT_KINDS:
            fault = _net_or_resource_fault(top, path, item, index, kind, fleet, group_names)
        elif kind == "machine-loss":
            fault = _machine_loss(Reader(top.source, path, item, top.problems, {"kind", "at", "machine", "machines"}),
                                  index, fleet)
        else:
            if kind is UNREADABLE:
                continue
            hint = difflib.get_close_matches(kind, FAULT_KINDS, n=1) if isinstance(kind, str) else []
            shown = repr(kind) if isinstance(kind, str) else describe(kind)
            _at(top, path + ("kind",), f"unknown fault kind {shown}" +
                (f" (did you mean '{hint[0]}'?)" if hint else f" (expected one of {', '.join(FAULT_KINDS)})"))
            continue
        if fault is not None:
            faults.append(fault)
    return faults


def _net_or_resource_fault(top: Reader, path: PathKey, item: dict[str, Any], index: int, kind: str,
                           fleet: Fleet | None, group_names: set[str] | None) -> Fault | None:
    """Network faults (the fault proxy: harness/run/faults/network) and cgroup limits (harness/run/isolation)."""
    from harness.scenario import faultspec
    network = kind in NET_FAULT_KINDS
    common = faultspec.NET_COMMON if network else faultspec.RESOURCE_COMMON
    extra = faultspec.NET_KEYS[kind] if network else faultspec.RESOURCE_KEYS[kind]
    r = Reader(top.source, path, item, top.problems, common | extra)
    if fleet is not None and fleet.simulated is not None:
        r.problem(("kind",), f"{kind} faults act on real hosts (a proxy, a cgroup); a simulated fleet has none")
        return None
    groups = _groups_field(r, group_names, "a fault")
    window = _window(r)
    hosts = _hosts_selection(r, _pool_size(fleet, groups), _pool_words(groups))
    if network:
        fault = faultspec.net_fault(r, index, kind, window, hosts, groups, group_names)
        if fault is not None and fleet is not None:
            faultspec.between_groups_ok(r, fault, {g.name: g.backends for g in fleet.groups})
        return fault
    return faultspec.resource_fault(r, index, kind, window, hosts, groups)


def _window(r: Reader) -> Window:
    """from / until / every + for: when a fault is active."""
    window = Window(start=r.get("from", _duration, default=0.0), until=r.get("until", _duration, default=None),
                    every=r.get("every", _positive_duration, default=None),
                    active=r.get("for", _positive_duration, default=None))
    if window.until is not None and window.until <= window.start:
        r.problem(("until",), f"'until' ({window.until:g}s) must come after 'from' ({window.start:g}s)")
    if window.active is not None and window.every is None:
        r.problem(("for",), "'for' (how long each window lasts) goes with 'every'")
    if window.active is not None and window.every is not None and window.active > window.every:
        r.problem(("for",), f"'for' ({window.active:g}s) is longer than 'every' ({window.every:g}s)")
    return window


def _machine_number(value: Any) -> int:
    """machine: N, the N-th cluster worker in placement order, from 1 (stored 0-based)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid(f"expected the number of a cluster worker's machine in placement order, from 1, "
                      f"got {describe(value)}")
    return value - 1


def _machine_loss(r: Reader, index: int, fleet: Fleet | None) -> MachineLoss | None:
    """{kind: machine-loss, at: 6s, machine: 2} or {..., machines: 1} (chosen by the seed): --cluster only."""
    if fleet is not None and fleet.simulated is not None:
        r.problem(("kind",), "a machine-loss loses a cluster worker's machine with the real hosts placed on it; "
                             "a simulated fleet has none")
        return None
    if r.has("machine") and r.has("machines"):
        r.problem(("machines",), "give either machine (which one, from 1) or machines (how many, chosen by the "
                                 "seed), not both")
    at = r.get("at", _duration, required=True, default=None)
    machine = r.get("machine", _machine_number, default=None)
    count = r.get("machines", as_positive_int, default=1)
    if at is None:
        return None
    return MachineLoss(index=index, at=at, machine=machine, count=1 if machine is not None else count)


def _host_loss(r: Reader, index: int, fleet_size: int) -> HostLoss | None:
    how = r.get("how", one_of("kill", "pause"), default="kill")
    if r.has("at") == r.has("every"):
        r.problem((), "a host-loss needs exactly one of 'at' (a time) or 'every' (an interval)")
        return None
    if r.has("at"):
        at = r.get("at", _duration, default=0.0)
        times: tuple[float, ...] = (at,)
        for key in ("from", "until"):
            if r.has(key):
                r.problem((key,), f"'{key}' goes with 'every', not with 'at'")
    else:
        every = r.get("every", _positive_duration, default=1.0)
        start = r.get("from", _duration, default=every)
        until = r.get("until", _duration, default=start + every * 1000)
        if r.has("until") and until <= start:
            r.problem(("until",), f"'until' ({until:g}s) must come after 'from' ({start:g}s)")
        count = int((until - start) / every) + 1 if until >= start else 0
        times = tuple(start + i * every for i in range(min(count, 100000)) if start + i * every < until)
    pause_for = 5.0
    if how == "pause":
        pause_for = r.get("for", _positive_duration, default=5.0)
    elif r.has("for"):
        r.problem(("for",), "'for' is the pause length; with how: kill use 'down_for'")
    down_for = r.get("down_for", _duration, default=0.0)
    if how == "pause" and r.has("down_for"):
        r.problem(("down_for",), "'down_for' goes with how: kill; a pause lasts 'for'")
    return HostLoss(index=index, how=how, times=times, hosts=_hosts_selection(r, fleet_size), pause_for=pause_for,
                    down_for=down_for)


def _pool_size(fleet: Fleet | None, groups: tuple[str, ...]) -> int:
    """How many hosts a fault with these groups chooses among (the whole fleet without groups)."""
    if fleet is None or not groups:
        return fleet.hosts if fleet else 1
    return sum(group.hosts for group in fleet.groups if group.name in groups) or fleet.hosts


def _groups_phrase(groups: tuple[str, ...] | list[str]) -> str:
    return f"group {groups[0]}" if len(groups) == 1 else f"groups {', '.join(groups)}"


def _pool_words(groups: tuple[str, ...]) -> str:
    """The subject of '... hosts asked but <the fleet has> N'."""
    if not groups:
        return "the fleet has"
    return _groups_phrase(groups) + (" has" if len(groups) == 1 else " have")


def _shim_fault(r: Reader, index: int, kind: str, fleet_size: int, groups: tuple[str, ...] = ()) -> ShimFault | None:
    mode = r.get("mode", one_of("random", "nth", "after", "budget"), default="random")
    mode_fits = not (kind == "lock-error" and mode == "budget")
    if not mode_fits:
        r.problem(("mode",), "budget mode is for alloc-fail only")
    window = _window(r)
    functions: tuple[str, ...] = ()
    known = ALLOC_FUNCTIONS if kind == "alloc-fail" else LOCK_FUNCTIONS
    for key in ("functions", "function"):
        if r.has(key):
            value = r.data[key]
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                r.problem((key,), "expected a function name or a list of them")
                continue
            for name in names:
                if name not in known:
                    r.problem((key,), f"unknown function {name!r} (known: {', '.join(known)})")
            functions += tuple(names)
    errno_name = "EDEADLK"
    if kind == "lock-error":
        errno_name = r.get("errno", one_of(*LOCK_ERRNOS), default="EDEADLK")
        if not hasattr(errno_module, errno_name):
            r.problem(("errno",), f"{errno_name} is not known on this system")
    callers_value = r.data.get("callers", MISSING)
    callers: tuple[str, ...] = ()
    if callers_value is not MISSING:
        names = [callers_value] if isinstance(callers_value, str) else callers_value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            r.problem(("callers",), "expected 'exe', 'any' or a list of module names")
        else:
            callers = tuple(names)
    probability = r.get("probability", _probability, default=0.0)
    fault = ShimFault(
        index=index, kind=kind, mode=mode, window=window, hosts=_hosts_selection(r, fleet_size, _pool_words(groups)),
        functions=functions,
        probability=probability, nth=r.get("nth", as_positive_int, default=0),
        after=r.get("after", lambda v: max(0, as_int(v)), default=0),
        budget=r.get("budget", units.parse_size, default=0) if kind == "alloc-fail" else 0,
        min_size=r.get("min_size", units.parse_size, default=0) if kind == "alloc-fail" else 0,
        max_size=r.get("max_size", units.parse_size, default=0) if kind == "alloc-fail" else 0,
        errno_name=errno_name, times=r.get("times", lambda v: as_int(v) if as_int(v) >= -1 else _bad_times(v),
                                           default=-1),
        callers=callers,
        spread=r.get("spread", _spread, default=0.0) if kind == "alloc-fail" else 0.0, groups=groups,
    )
    return fault if mode_fits else None   # a mode the kind cannot have: its parameters are not worth checking


def _spread(value: Any) -> float:
    fraction = units.parse_fraction(value)
    if fraction >= 1.0:
        raise Invalid(f"spread must be below 100% (each host keeps a positive budget), got {value!r}")
    return fraction


def _bad_times(value: Any) -> int:
    raise Invalid(f"expected the number of failures to inject (-1 for unlimited), got {value}")


def _probability(value: Any) -> float:
    return units.parse_fraction(value)


def _check_shim_fault(r: Reader, fault: ShimFault) -> None:
    """The parameter its mode needs must be there (and nothing of another mode)."""
    needs = {"random": "probability", "nth": "nth", "after": "after", "budget": "budget"}
    needed = needs[fault.mode]
    if not r.has(needed) and needed not in r.misspelt:
        r.problem((needed,), f"mode {fault.mode} needs '{needed}'")
    for mode, key in needs.items():
        if mode != fault.mode and r.has(key) and not (key == "probability" and fault.mode == "random"):
            r.problem((key,), f"'{key}' belongs to mode {mode}, but this fault's mode is {fault.mode}")
    if fault.max_size and fault.min_size > fault.max_size:
        r.problem(("min_size",), "min_size is larger than max_size")


def _variants(top: Reader, fleet: Fleet | None = None, group_names: set[str] | None = None) -> list[Variant]:
    variants: list[Variant] = []
    names: set[str] = set()
    for index, (path, item) in enumerate(top.items("variants")):
        r = Reader(top.source, path, item, top.problems, {"name", "args", "env", "command", "build", "allocator",
                                                                   "faults", "groups"})
        if not r.ok:
            continue
        name = r.get("name", as_str, required=True, default="?")
        if r.has("name") and name in names:
            r.problem(("name",), f"variant name {name!r} is used twice")
        names.add(name)
        allocator = r.get("allocator", as_str, default=None)
        if allocator is not None and allocator not in ALLOCATORS and "/" not in allocator:
            r.problem(("allocator",), f"expected one of {', '.join(ALLOCATORS)} or a path to a preloadable "
                                      f"allocator, got {allocator!r}")
        command = r.get("command", as_argv, default=None)
        _templates_ok(r, "command", command)
        args = r.get("args", as_str_map, default={})
        for flag, value in args.items():
            _templates_ok(r, ("args", flag), value)
        groups = _groups_field(r, group_names, "a variant")
        if fleet is not None and fleet.groups and not groups:
            _variant_fits_every_group(r, fleet, command, args)
        variants.append(Variant(name=name, args=args, faults=r.get("faults", as_bool, default=True),
                                env=r.get("env", as_str_map, default={}), command=command,
                                build=r.get("build", as_argv, default=None), allocator=allocator, groups=groups,
                                line=top.source.line((*path, "allocator")), index=index))
    return variants


def _variant_fits_every_group(r: Reader, fleet: Fleet, command: tuple[str, ...] | None,
                              args: dict[str, str]) -> None:
    """A variant without `groups:` changes every group. In a mixed fleet, one command for all, or a flag
    that some group's command lacks (it would be added there, and most servers exit on an unknown flag),
    is almost surely meant for some groups only: say so rather than start a fleet that cannot run."""
    if command is not None and len(fleet.groups) > 1:
        r.problem(("command",), f"this command would replace the command of every group "
                                f"({', '.join(g.name for g in fleet.groups)}): say which groups it is for "
                                f"(groups: [...])")
        return
    for flag in args:
        lacking = [g.name for g in fleet.groups if flag not in (command or g.target.command)]
        if lacking:
            having = [g.name for g in fleet.groups if g.name not in lacking]
            hint = f" (groups: [{', '.join(having)}])" if having else " (groups: [...])"
            r.problem(("args", flag), f"flag {flag!r} is not in the command of {_groups_phrase(lacking)} "
                                      f"and would be added there: say which groups this variant is for{hint}")


_COMPARISON = re.compile(r"^\s*(<=|>=|==|<|>)\s*(.+?)\s*$")


def _expectations(top: Reader, load: LoadShape | None, variants: list[Variant],
                  written: LoadShape | None = None, target: Target | None = None) -> list[Expectation]:
    result: list[Expectation] = []
    variant_names = {v.name for v in variants}
    for index, (path, item) in enumerate(top.items("expect")):
        if isinstance(item, dict) and "compare" in item:
            continue  # variant comparisons: see _compare_expectations
        r = Reader(top.source, path, item, top.problems, set(EXPECT_METRICS) | {"phase", "variant", "request"})
        if not r.ok:
            continue
        metrics = [key for key in r.data if key in EXPECT_METRICS]
        if len(metrics) != 1:
            r.problem((), f"each expectation checks exactly one of: {', '.join(EXPECT_METRICS)}")
            continue
        metric = metrics[0]
        raw = r.data[metric]
        try:
            op, value = _threshold(metric, raw)
        except ValueError as exc:
            r.problem((metric,), str(exc))
            continue
        phase = r.get("phase", as_str, default=None)
        if phase is not None and load is not None and not load.windows(phase) and \
                not (written is not None and written.windows(phase)):
            r.problem(("phase",), f"no load phase named {phase!r} (phases: "
                                  f"{', '.join(p.name for p in (written or load).phases)})")
        variant = r.get("variant", as_str, default=None)
        if variant is not None and variant not in variant_names:
            r.problem(("variant",), f"no variant named {variant!r}")
        request = r.get("request", as_str, default=None)
        if request is not None:
            names = [spec.name for spec in target.requests] if target is not None else []
            if metric not in REQUEST_METRICS:
                r.problem(("request",), f"{metric} is a fleet-wide figure; per request: {', '.join(REQUEST_METRICS)}")
            elif target is not None and request not in names:
                hint = difflib.get_close_matches(request, names, n=1)
                r.problem(("request",), f"no request named {request!r}" + (f" (did you mean '{hint[0]}'?)" if hint
                                        else f" (requests: {', '.join(names)})"))
        result.append(Expectation(index=index, line=top.source.line(path), metric=metric, op=op, value=value,
                                  text=f"{metric} {raw}" if not isinstance(raw, str) or not _COMPARISON.match(raw)
                                  else f"{metric} {raw.strip()}", phase=phase, variant=variant, request=request))
    return result


def _compare_expectations(top: Reader, variants: list[Variant]) -> list[Any]:
    """`{compare: [variant, reference], crash_rate: "no worse"}` or `{..., p99_latency: "< 1.1x"}`."""
    result = []
    names = {v.name for v in variants}
    for index, (path, item) in enumerate(top.items("expect")):
        if not isinstance(item, dict) or "compare" not in item:
            continue
        r = Reader(top.source, path, item, top.problems, {"compare"} | set(COMPARE_METRICS))
        if not r.ok:
            continue
        metrics = [key for key in r.data if key in COMPARE_METRICS]
        if len(metrics) != 1:
            r.problem((), f"a comparison checks exactly one of: {', '.join(COMPARE_METRICS)}")
            continue
        pair = r.data["compare"]
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(n, str) for n in pair):
            r.problem(("compare",), "expected two variant names, like [jemalloc, glibc]")
            continue
        for name in pair:
            if name not in names:
                r.problem(("compare",), f"no variant named {name!r}")
        try:
            result.append(VariantExpectation.parse(pair, metrics[0], str(r.data[metrics[0]]), index=index,
                                                   line=top.source.line(path)))
        except ValueError as exc:
            r.problem((metrics[0],), str(exc))
    return result


def _threshold(metric: str, raw: Any) -> tuple[str, float]:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if metric in ("crashes",):
            return "<=", float(raw)
        raise ValueError(f"write a comparison like \"< 250ms\" or \"<= 1%\", got {raw!r}")
    if not isinstance(raw, str):
        raise ValueError(f"expected a comparison like \"< 250ms\", got {describe(raw)}")
    match = _COMPARISON.match(raw)
    if not match:
        raise ValueError(f"expected a comparison like \"< 250ms\" (operators < <= > >= ==), got {raw!r}")
    op, text = match.groups()
    if metric in LATENCY_METRICS:
        return op, units.parse_duration(text)
    if metric in ("error_rate", "timeout_rate"):
        return op, units.parse_fraction(text)
    if metric == "throughput":
        return op, units.parse_rate(text)
    try:
        return op, float(int(text))
    except ValueError:
        raise ValueError(f"expected a whole number after {op!r}, got {text!r}") from None


def _at(reader: Reader, path: PathKey, message: str) -> None:
    reader.problems.append(problem(reader.source.file, reader.source.line(path), path, message))


def lock_errno(name: str) -> int:
    return int(getattr(errno_module, name))
