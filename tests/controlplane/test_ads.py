"""controlplane.ads limits (issue 16.14): stream caps refused with RESOURCE_EXHAUSTED,
and nothing a client sends grows the control plane's memory.

An in-process gRPC server with :class:`~controlplane.ads.AdsServer` and raw ADS client
streams on 127.0.0.1 (the engine's client would reconnect by itself; these tests need
to hold streams open and read the refusals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from controlplane.ads import MAX_NACK_TEXT, MAX_WARNED_TYPES, AdsLimits, AdsServer
from controlplane.table import RouteTable
from engine.xds.resources import ROUTE_CHAIN_TYPE
from tests.support import registry_from


@dataclass
class Rig:
    ads: AdsServer
    port: int
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def open(self, node: str, *, metadata: dict[str, Any] | None = None) -> Any:
        """A stream subscribed to routes as ``node``, once the server has answered it."""
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.channels.append(channel)
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        meta = struct_pb2.Struct()
        meta.update(metadata or {})
        await call.write(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=node, metadata=meta), type_url=ROUTE_CHAIN_TYPE
            )
        )
        response = await asyncio.wait_for(call.read(), 5)
        assert response.type_url == ROUTE_CHAIN_TYPE
        call.first = response  # the routes response, for a test's ACK / NACK
        return call

    async def refused(self, node: str) -> str:
        """Open a stream that must be refused; the refusal's details."""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.open(node)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return str(info.value.details())


@contextlib.asynccontextmanager
async def serving(limits: AdsLimits) -> AsyncIterator[Rig]:
    """An ADS server with ``limits`` on 127.0.0.1; closes every client channel after."""
    server = grpc.aio.server()
    ads = AdsServer(RouteTable(registry_from("addHeader")), limits)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rig = Rig(ads, port)
    try:
        yield rig
    finally:
        for channel in rig.channels:
            await channel.close(None)
        await server.stop(0)


async def until(predicate: Callable[[], object], what: str) -> None:
    try:
        async with asyncio.timeout(5):
            while not predicate():  # noqa: ASYNC110 - server state has no event to await
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_streams_over_the_per_address_cap_are_refused():
    async with serving(AdsLimits(max_streams=10, max_streams_per_peer=2)) as rig:
        first = await rig.open("a")
        await rig.open("b")
        details = await rig.refused("c")
        assert details == (
            "2 ADS streams open from ipv4:127.0.0.1, the limit per address "
            "(--xds-max-streams-per-client) is 2"
        )
        assert [e["node"] for e in rig.ads.status()] == ["a", "b"]  # refused: not recorded
        first.cancel()  # a closed stream frees its place
        await until(lambda: rig.ads._open == 1, "the closed stream released")
        await rig.open("c")


async def test_streams_over_the_total_cap_are_refused():
    async with serving(AdsLimits(max_streams=2, max_streams_per_peer=10)) as rig:
        await rig.open("a")
        await rig.open("b")
        assert await rig.refused("c") == ("2 ADS streams open, the limit (--xds-max-streams) is 2")


async def test_streams_over_the_per_node_cap_are_refused():
    async with serving(AdsLimits(max_streams_per_node=1)) as rig:
        held = await rig.open("same")
        details = await rig.refused("same")
        assert "1 ADS streams open for node 'same'" in details
        await rig.open("other")
        held.cancel()
        await until(lambda: "same" not in rig.ads._per_node, "the node count released")
        await rig.open("same")
        assert rig.ads._per_node == {"same": 1, "other": 1}


async def test_what_a_client_sends_stays_bounded(caplog):
    caplog.set_level(logging.WARNING, logger="controlplane.ads")
    async with serving(AdsLimits()) as rig:
        call = await rig.open("big", metadata={"blob": "x" * 100_000})
        for n in range(200):  # types nobody serves: logged a few times, never kept
            await call.write(discovery_pb2.DiscoveryRequest(type_url=f"type.example/T{n}"))
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=ROUTE_CHAIN_TYPE,
                response_nonce=call.first.nonce,
                error_detail=status_pb2.Status(code=3, message="e" * 1_000_000),
            )
        )
        await until(lambda: rig.ads.status()[0]["nackError"], "the NACK recorded")
        row = rig.ads.status()[0]
        assert list(row["metadata"]) == ["omitted"]  # not the 100 kB blob
        assert row["metadata"]["omitted"].endswith(" bytes, over the limit of 16384")
        assert len(row["nackError"]) < MAX_NACK_TEXT + 100
        assert row["nackError"].endswith("... (934464 more characters not kept)")
        unknown = [r for r in caplog.records if "not served" in r.getMessage()]
        assert len(unknown) == MAX_WARNED_TYPES
        assert "further unknown types on this stream are not logged" in unknown[-1].getMessage()


async def test_an_oversized_node_id_is_refused(caplog):
    async with serving(AdsLimits()) as rig:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rig.open("n" * 10_000)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "node id of 10000 characters; at most 256"
        await until(lambda: rig.ads._open == 0, "the refused stream released")
        assert not rig.ads._per_node


async def test_node_ids_and_nack_texts_cannot_forge_log_lines(caplog):
    # Both are the client's words (without mTLS, anyone's): a newline in them would start
    # a line that reads like another record, an escape would reach the reader's terminal.
    caplog.set_level(logging.INFO, logger="controlplane.ads")
    forged = "\n2026-12-04 00:00:00,000 INFO [1] controlplane.audit: audit: forged\x1b[2J\x00"
    async with serving(AdsLimits()) as rig:
        call = await rig.open("edge" + forged)
        await call.write(discovery_pb2.DiscoveryRequest(type_url="type.example/T" + forged))
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=ROUTE_CHAIN_TYPE,
                response_nonce=call.first.nonce,
                error_detail=status_pb2.Status(code=3, message="first\nsecond" + forged),
            )
        )
        await until(lambda: rig.ads.status()[0]["nackError"], "the NACK recorded")
        call.cancel()
        await until(lambda: rig.ads._open == 0, "the stream closed")
        row = rig.ads.status()[0]
        assert row["node"] == "edge" + forged  # the status (JSON) keeps the words as sent
        assert row["nackError"] == "first\nsecond" + forged
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "NACKed" in m or "closed" in m]) == 2, messages
    for message in messages:
        assert message.isprintable(), message
    assert any("NACKed" in m and "first\\nsecond\\n2026-12-04" in m for m in messages)


async def test_an_ack_records_the_version_sent_not_the_clients_words():
    # The ACK names its response by nonce; its version_info is the client's text (up to
    # the 4 MiB message limit), which was kept per stream and shown by /status as it was.
    async with serving(AdsLimits()) as rig:
        call = await rig.open("edge")
        sent = call.first.version_info
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=ROUTE_CHAIN_TYPE,
                response_nonce=call.first.nonce,
                version_info="v" * 3_000_000,
            )
        )
        await until(lambda: rig.ads.status()[0]["ackedVersion"], "the ACK recorded")
        assert rig.ads.status()[0]["ackedVersion"] == sent
