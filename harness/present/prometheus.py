"""Prometheus metrics: a crash counter (as in a core_pattern-pipe + node_exporter setup) and a few
gauges of the load and the fleet, served live on --metrics ADDR:PORT and written as a textfile for
node_exporter's textfile collector (results/<run-id>/metrics.prom) during and after every run."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from harness.base.errors import HarnessError
from harness.base.safefs import write_replace


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9108' or ':9108' (loopback) or '9108'."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise HarnessError(f"--metrics takes ADDR:PORT like 127.0.0.1:9108, got {text!r}") from None
    if not 0 < number < 65536:
        raise HarnessError(f"--metrics port out of range: {number}")
    return host or "127.0.0.1", number


class Metrics:
    def __init__(self, textfile: Path, listen: tuple[str, int] | None = None):
        self.registry = CollectorRegistry()
        self.textfile = textfile
        self.crashes = Counter("harness_crashes", "Target processes that died by a signal the harness did not send",
                               ["host", "program", "signal", "core", "variant"], registry=self.registry)
        self.offered = Gauge("harness_offered_rate", "Offered load in the last second (requests/s)",
                             registry=self.registry)
        self.achieved = Gauge("harness_achieved_rate", "Good replies in the last second (requests/s)",
                              registry=self.registry)
        self.errors = Gauge("harness_error_rate", "Failed requests in the last second by kind (requests/s)", ["kind"],
                            registry=self.registry)
        self.alive = Gauge("harness_hosts_alive", "Hosts up (or paused)", registry=self.registry)
        self.hosts = Gauge("harness_hosts", "Hosts in the fleet", registry=self.registry)
        self.p99 = Gauge("harness_latency_p99_seconds", "p99 latency in the last second, from intended send time",
                         registry=self.registry)
        self._server = None
        if listen is not None:
            try:
                self._server, self._thread = start_http_server(listen[1], addr=listen[0], registry=self.registry)
            except OSError as exc:
                raise HarnessError(f"cannot serve metrics on {listen[0]}:{listen[1]}: {exc.strerror or exc}") from None

    def crash(self, host: str, executable: str | None, signal_name: str, core: bool, variant: str) -> None:
        self.crashes.labels(host=host, program=os.path.basename(executable or "?"), signal=signal_name,
                            core="yes" if core else "no", variant=variant).inc()

    def write_textfile(self) -> None:
        """Atomic: a new temp file (0600, never through a symlink) renamed into place."""
        try:
            write_replace(self.textfile, generate_latest(self.registry))
        except OSError:
            pass  # metrics must never stop a run

    def close(self, write: bool = True) -> None:
        if write:
            self.write_textfile()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
