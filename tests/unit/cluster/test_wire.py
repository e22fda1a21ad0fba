"""The command's listener hands a connection only to whoever expects its token; anything else is closed
before a byte of it is unpickled (real sockets on loopback)."""

from __future__ import annotations

import pickle
import socket

import trio

from harness.cluster.wire import HELLO, Callbacks, dial


async def _closed(stream: trio.SocketStream) -> bool:
    try:
        return await stream.receive_some(10) == b""
    except trio.BrokenResourceError:
        return True


async def _exchange() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    callbacks = Callbacks(listeners[0])
    port = listeners[0].socket.getsockname()[1]
    token, calls = callbacks.expect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(callbacks.serve)
        # a stranger: a wrong token, then a pickle that would run code if it were ever loaded
        stranger = await trio.open_tcp_stream("127.0.0.1", port)
        await stranger.send_all(HELLO.pack(b"x" * 32, 0) + pickle.dumps(socket.socket))
        assert await _closed(stranger)          # by the listener, unread (hence a reset, or an end)
        assert token in callbacks.waiting
        channel = await dial("127.0.0.1", port, token, 3)
        number, theirs = await calls.receive()
        assert number == 3 and token not in callbacks.waiting    # one use
        await channel.send(("hello", 1))
        assert await theirs.receive() == ("hello", 1)
        # the same token again is a stranger now
        again = await trio.open_tcp_stream("127.0.0.1", port)
        await again.send_all(HELLO.pack(token, 3))
        assert await _closed(again)
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()


def test_a_known_token_gets_its_channel_and_a_wrong_one_is_closed_unread() -> None:
    trio.run(_exchange)


async def _sealed() -> None:
    import pytest

    from harness.base.errors import HarnessError
    from harness.run.driverpool import FRAME, Channel, link_keys
    token = b"t" * 32
    for attack in ("forged", "replayed", "flipped"):
        command_end, machine_end = socket.socketpair()
        command = Channel(command_end, keys=link_keys(token, "command"))
        machine = Channel(machine_end, keys=link_keys(token, "machine"))
        await machine.send(("usage", {1: 2}))
        await command.send(("alive",))
        assert await command.receive() == ("usage", {1: 2})
        assert await machine.receive() == ("alive",)
        raw = trio.socket.from_stdlib_socket(machine_end.dup())
        evil = pickle.dumps(("say", "run me"))
        if attack == "forged":      # a frame sealed with a key the sender does not have
            frame = b"\0" * 32 + evil
        elif attack == "replayed":  # the first frame again, byte for byte (a right MAC for sequence 0)
            import hashlib
            import hmac
            key = link_keys(token, "machine")[0]
            first = pickle.dumps(("usage", {1: 2}), protocol=pickle.HIGHEST_PROTOCOL)
            frame = hmac.new(key, (0).to_bytes(8, "big") + first, hashlib.sha256).digest() + first
        else:                       # a right frame for sequence 1 with one byte changed on the way
            import hashlib
            import hmac
            key = link_keys(token, "machine")[0]
            frame = bytearray(hmac.new(key, (1).to_bytes(8, "big") + evil, hashlib.sha256).digest() + evil)
            frame[-2] ^= 1
            frame = bytes(frame)
        await raw.send(FRAME.pack(len(frame)) + frame)
        with pytest.raises(HarnessError, match="failed its check"):
            await command.receive()
        raw.close()
        for end in (command, machine):
            await end.aclose()


def test_a_sealed_link_refuses_forged_replayed_and_altered_frames() -> None:
    trio.run(_sealed)
