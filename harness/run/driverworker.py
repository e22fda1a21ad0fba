"""One driver worker process (harness.run.driverpool starts it): `python -m harness.run.driverworker FD`.

FD is its end of a socketpair to the harness. The harness sends the configuration, then host changes
(ready, gone, ejected elsewhere), then the plan to send; the worker sends back each second's counters,
events, ejections, and at the end what it gathered. It exits when the socket closes (the harness ended
the trial, or died).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from dataclasses import replace
from typing import Any

import trio

from harness.run.balancer import Balancer
from harness.run.driver import Driver
from harness.run.driverpool import LINK_ENV, Channel, link_keys, pack_counters
from harness.run.hdrbatch import to_sparse
from harness.plan.streams import PlanSpec


class WorkerRun:
    def __init__(self, channel: Channel, config: dict[str, Any]):
        self.channel = channel
        self.number: int = config["worker"]
        self.workers: int = config["workers"]
        ports = config["ports"]
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[Any](float("inf"))
        self.driver = Driver(config["target"], config["client"], ports, Balancer(len(ports), config["policy"]),
                             config["expect_replies"], seed=config["seed"], on_event=self._event,
                             worker=self.number, on_eject=self._eject, addrs=config.get("addrs"))
        self.load_scope: trio.CancelScope | None = None
        self.done = False
        self.told_up: set[int] = set()       # hosts the harness said are up (and not gone since)

    def _event(self, kind: str, host: int | None, pid: int | None, **detail: Any) -> None:
        self.outbox_send.send_nowait(("event", kind, host, pid, detail))

    def _eject(self, host: int, generation: int) -> None:
        self.outbox_send.send_nowait(("eject", host, generation))

    def _view(self) -> tuple[list[bool], list[int]]:
        balancer = self.driver.balancer
        return list(balancer.in_rotation), list(balancer.inflight)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender)
            await nursery.start(self.driver.serve)
            self.outbox_send.send_nowait(("ready",))
            while True:
                message = await self.channel.receive()
                if message is None:
                    break             # the harness closed the socket (or died): nothing left to do
                kind = message[0]
                if kind == "host_ready":
                    probe = len(message) > 3 and message[3]
                    if not probe:         # (one to probe first may not answer: nothing waits for it)
                        self.told_up.add(message[1])
                    self.driver.host_ready(message[1], message[2], probe=probe)
                elif kind == "connections":   # a standby taking a lost shard's share: that shard's connections
                    self.driver.client = replace(self.driver.client, connections=message[1])
                elif kind == "host_gone":
                    _, host, sequence = message
                    self.told_up.discard(host)
                    self.driver.host_gone(host)
                    self.outbox_send.send_nowait(("gone-ack", host, sequence, self.driver.lost_inflight[host]))
                elif kind == "eject":
                    self.driver.eject(message[1], message[2])
                elif kind == "start":
                    if len(message) > 4:     # a shard: its number (a standby's: the lost shard's)
                        self.number = self.driver.worker = message[4]
                    taking_over = len(message) > 5 and message[5]   # (harness.cluster.shards)
                    nursery.start_soon(self._load, message[1], message[2], message[3], taking_over)
                elif kind == "stop":
                    if self.load_scope is not None:
                        self.load_scope.cancel()
                    elif not self.done:
                        self._finish()
            nursery.cancel_scope.cancel()

    async def _sender(self) -> None:
        async for message in self.outbox_receive:
            try:
                await self.channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return            # the harness closed its end: the main loop sees it and ends

    async def _load(self, plan: PlanSpec, start_monotonic: float, until_monotonic: float | None,
                    taking_over: bool = False) -> None:
        offset = trio.current_time() - time.perf_counter()          # CLOCK_MONOTONIC -> trio clock
        start = start_monotonic + offset
        until = None if until_monotonic is None else until_monotonic + offset
        with trio.CancelScope() as self.load_scope:     # (a stop while it connects ends it too)
            if taking_over:
                await self._connected()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reporter, start, int(plan.start_at))
                await self.driver.send_all(plan, start, until, worker=self.number, workers=self.workers)
                await self.driver.drain()
                self.driver.abandon_pending()
                nursery.cancel_scope.cancel()
        self.load_scope = None
        self._finish()

    async def _connected(self, bound: float = 1.0) -> None:
        """A standby taking over was told the hosts up just now: its first arrivals wait (a bounded while)
        for its connections to them, going out late rather than finding nobody in rotation (their lateness
        is measured: latency runs from each arrival's intended time)."""
        with trio.move_on_after(bound):
            while not all(self.driver.balancer.in_rotation[h] for h in self.told_up):
                await trio.sleep(0.001)

    async def _reporter(self, t0: float, first: int) -> None:
        """Each second's counters at the same boundaries as the harness's sampler (t0 + k + 1)."""
        second = first
        while True:
            await trio.sleep_until(t0 + second + 1)
            counters = self.driver.swap_counters()
            self.outbox_send.send_nowait(("second", second, pack_counters(counters), self._view()))
            second += 1

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        driver = self.driver
        counters = driver.swap_counters()
        stats = {"lag": to_sparse(driver.lag), "resent": driver.resent, "protocol_errors": driver.protocol_errors,
                 "unsent": driver.unsent, "unsent_exact": driver.unsent_exact}
        self.outbox_send.send_nowait(("done", pack_counters(counters), stats, self._view()))


async def main_async(fd: int) -> None:
    token = os.environ.pop(LINK_ENV, None)       # a shard on a cluster machine: its link to the command is sealed
    channel = Channel(socket.socket(fileno=fd), keys=link_keys(bytes.fromhex(token), "machine") if token else None)
    message = await channel.receive()
    if message is None or message[0] != "config":
        return
    run = WorkerRun(channel, message[1])
    # Start-up garbage is long-lived: freeze it so collections during the load stay short.
    gc.collect()
    gc.freeze()
    await run.run()


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m harness.run.driverworker FD (started by the harness, not by hand)")
    try:
        trio.run(main_async, int(sys.argv[1]))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
