"""Readiness and set-up of a host, by its protocol: what happens between its start and its first load.

Readiness is a TCP connect by default, or a probe request that must get a good reply
(`ready: {request: PING, expect: "+PONG"}`, `ready: {http: /health, status: 200}`): a service that
accepts connections before it can serve is not ready yet. Set-up (`target.setup`) then sends its
requests to every incarnation (10,000 SETs, say), and only then does the host join the balancer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from harness.run.exchange import Conversation, Judge, Outcome, connect, exchange
from harness.plan.streams import key_name
from harness.protocols import codec
from harness.scenario.model import Scenario, Target

PROBE_KEY = "ready"
SETUP_WINDOW = 64


class HostPrep:
    def __init__(self, scenario: Scenario):
        self.seed = scenario.seed
        self.key_space = scenario.client.keys.space
        self.client_timeout = scenario.client.timeout

    async def ready(self, target: Target, port: int, timeout: float, addr: str = "127.0.0.1") -> Outcome:
        """One readiness check within `timeout` (`addr`: a host in its own network namespace has its own)."""
        ready = target.ready
        if ready.probe is None or ready.protocol is None:
            sock = await connect(port, max(timeout, 0.05), addr)
            if sock is None:
                return Outcome(error=f"port {port} does not accept connections")
            sock.close()
            return Outcome(good=1)
        conversation = Conversation(ready.protocol, target.terminator)
        payload = codec(ready.protocol).compile(ready.probe, self.seed).encode(PROBE_KEY, 0)
        return await exchange(port, conversation, [(payload, conversation.judge(ready.probe, PROBE_KEY, 0))],
                              timeout=max(timeout, 0.05), window=1, addr=addr)

    def setup_count(self, target: Target) -> int:
        return sum(self.key_space if step.all_keys else step.count for step in target.setup)

    async def setup(self, target: Target, port: int, addr: str = "127.0.0.1") -> tuple[Outcome, float]:
        """Every set-up request, pipelined; (outcome, seconds it took)."""
        started = time.monotonic()
        conversation = Conversation(target.protocol, target.terminator)
        outcome = await exchange(port, conversation, self._setup_requests(target, conversation),
                                 timeout=max(target.ready.timeout, self.client_timeout), window=SETUP_WINDOW,
                                 addr=addr)
        return outcome, time.monotonic() - started

    def _setup_requests(self, target: Target, conversation: Conversation) -> Iterator[tuple[bytes, Judge]]:
        module = codec(target.protocol)
        for step in target.setup:
            encoder = module.compile(step.request, self.seed)
            count = self.key_space if step.all_keys else step.count
            for seq in range(count):
                key = key_name(seq % self.key_space)
                yield encoder.encode(key, seq), conversation.judge(step.request, key, seq)
