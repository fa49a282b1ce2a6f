"""The MLLP client against real sockets: an answer is read whole, and every way a peer
can fail maps to a retriable MllpError (no asyncio, socket or ssl error escapes)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from radflow_core.mllp import END_BLOCK, START_BLOCK
from radflow_devstack.mllp_peer import MllpPeer
from radflow_devstack.pki import Authority
from radflow_devstack.processes import free_port
from radflow_rules.destinations import Tls
from report_return.mllp import (
    AckTimeout,
    ConnectionLost,
    MllpClient,
    MllpError,
    PeerUnreachable,
)
from report_return.sites import Site

MESSAGE = b"MSH|^~\\&|A|B|C|D|20261123||ORU^R01^ORU_R01|CID|P|2.5.1\rPID|1||X"

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(behaviour: Behaviour) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(behaviour, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def site(port: int, **kwargs: object) -> Site:
    return Site("north", "127.0.0.1", port, ack_timeout_s=0.5, connect_timeout_s=1, **kwargs)


async def test_an_answer_is_read_to_its_end_block_across_several_packets() -> None:
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(END_BLOCK)
            for piece in (b"junk" + START_BLOCK + b"MSH|^~\\&", b"\rMSA|AA|CID", END_BLOCK):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
        finally:
            writer.close()
            done.set()

    server, port = await serve(answer)
    async with server:
        got = await MllpClient(site(port)).exchange(MESSAGE)
        await done.wait()
    assert got.data == b"MSH|^~\\&\rMSA|AA|CID" and got.latency_s > 0


async def test_the_hl7apy_peer_receives_the_message_as_sent() -> None:
    peer = MllpPeer().start()
    try:
        got = await MllpClient(site(peer.port)).exchange(MESSAGE)
    finally:
        peer.stop()
    assert b"MSA|AR|CID" in got.data  # a PID without the rest does not validate
    assert peer.received[0].er7 == MESSAGE.decode()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.read()  # until the client gives up and closes
    finally:
        writer.close()


async def closes_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(END_BLOCK)
        writer.write(START_BLOCK + b"MSA|A")
    finally:
        writer.close()


async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


@pytest.mark.parametrize(
    ("behaviour", "error", "written"),
    [
        (never_answers, AckTimeout, True),
        (closes_after_reading, ConnectionLost, True),
        (resets, ConnectionLost, None),
    ],
)
async def test_peer_failures_are_retriable_mllp_errors(
    behaviour: Behaviour, error: type[MllpError], written: bool | None
) -> None:
    server, port = await serve(behaviour)
    async with server:
        with pytest.raises(error) as info:
            await MllpClient(site(port)).exchange(MESSAGE)
    assert info.value.retriable
    if written is not None:
        assert info.value.written is written


async def test_nothing_listening_is_peer_unreachable() -> None:
    with pytest.raises(PeerUnreachable) as info:
        await MllpClient(site(free_port())).exchange(MESSAGE)
    assert info.value.retriable and not info.value.written


async def test_tls_to_a_plain_listener_is_peer_unreachable_not_an_ssl_error() -> None:
    server, port = await serve(never_answers)
    async with server:
        with pytest.raises(PeerUnreachable) as info:
            await MllpClient(site(port, tls=Tls())).exchange(MESSAGE)
    assert isinstance(info.value.__cause__, ssl.SSLError | OSError | TimeoutError)


async def test_mutual_tls_with_the_sites_ca_and_client_certificate(tmp_path: Path) -> None:
    authority = Authority(tmp_path / "ca")
    server_cert = authority.issue("ris", server=True)
    client_cert = authority.issue("radflow", server=False)
    peer = MllpPeer().start()  # its answer() is used behind the TLS listener below
    done = asyncio.Event()

    async def ris(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            framed = await reader.readuntil(END_BLOCK)
            writer.write(peer.answer(framed[1:-2].decode()).encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client that had no certificate
        finally:
            writer.close()
            done.set()

    context = authority.server_context(server_cert, require_client_cert=True)
    server = await asyncio.start_server(ris, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        tls = Tls(authority.ca_file, client_cert.cert, client_cert.key)
        got = await MllpClient(site(port, tls=tls)).exchange(MESSAGE)
        assert b"|CID|" in got.data and peer.received[0].control_id == "CID"
        await done.wait()
        with pytest.raises(MllpError):  # no client certificate: the RIS refuses
            await MllpClient(site(port, tls=Tls(authority.ca_file))).exchange(MESSAGE)
        with pytest.raises(PeerUnreachable):  # a RIS certificate from another CA
            await MllpClient(site(port, tls=Tls())).exchange(MESSAGE)
    peer.stop()


async def test_the_stand_in_ris_of_make_run_answers_over_tls(tmp_path: Path) -> None:
    authority = Authority(tmp_path / "ca")
    cert = authority.issue("ris", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert.cert), str(cert.key))
    peer = MllpPeer(tls=context).start()
    try:
        got = await MllpClient(site(peer.port, tls=Tls(authority.ca_file))).exchange(MESSAGE)
        assert b"MSA|AR|CID|" in got.data  # answered (MESSAGE is no valid ORU^R01)
        with pytest.raises(MllpError):  # plain MLLP to a TLS listener gets no answer
            await MllpClient(site(peer.port)).exchange(MESSAGE)
    finally:
        peer.stop()
