"""The Workload API end to end: dev-spire against py-spiffe (unmodified) and against authd's client."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import textwrap
from collections.abc import AsyncIterator

import grpc
import pytest
from cryptography import x509

from authd.errors import SpireError
from authd.identity import Selector, SpiffeId
from authd.spire._proto import workload_pb2
from authd.spire.agent import StreamBoard
from authd.spire.dev.registry import agent_id
from authd.spire.dev.service import DevSpire, workload_socket
from authd.spire.entries import EntryClient, RegistrationEntry
from authd.spire.workload import SECURITY_HEADER, WorkloadApiClient, fetch_x509_context
from authd.svids import EventKind, SvidStore
from authd.x509svid import BundleSet, X509Bundle, authorize_id, verify_chain
from tests.fakes.backoff import CountingBackoff
from tests.integration.devspire import (
    AUTHD_ID,
    ME,
    NODE,
    TD,
    entry_socket,
    next_event,
    now,
    options,
    raw_fetch,
    register_after_a_decoy,
    running,
    short_dir,
    workload_endpoint,
)

PARENT = agent_id(TD, "node-a")

PY_SPIFFE_CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    from cryptography.hazmat.primitives.serialization import Encoding
    from spiffe import TrustDomain, WorkloadApiClient
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    socket = sys.argv[1]
    out = {}
    with WorkloadApiClient("unix://" + socket) as client:
        context = client.fetch_x509_context()
        svid = context.default_svid
        out["spiffe_id"] = str(svid.spiffe_id)
        out["chain"] = [c.public_bytes(Encoding.DER).hex() for c in svid.cert_chain]
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("example.org"))
        out["bundle"] = [c.public_bytes(Encoding.DER).hex() for c in bundle.x509_authorities]
        out["first_svid_id"] = str(client.fetch_x509_svid().spiffe_id)
    # The same call through py-spiffe's own generated stub, without the header its client adds.
    with grpc.insecure_channel("unix:" + socket) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest()))
            out["without_header"] = ["OK", ""]
        except grpc.RpcError as err:
            out["without_header"] = [err.code().name, err.details()]
    print(json.dumps(out))
    """
)


@pytest.fixture
async def spire() -> AsyncIterator[DevSpire]:
    with short_dir() as directory:
        async with running(options(directory, svid_ttl=dt.timedelta(seconds=5))) as dev:
            yield dev


async def create(spire: DevSpire, *entries: RegistrationEntry) -> list[str]:
    async with EntryClient(entry_socket(spire.options.directory)) as client:
        results = await client.create_entries(entries)
    assert all(r.ok for r in results), results
    return [r.id for r in results]


async def test_py_spiffe_fetches_an_svid_that_verifies_and_is_refused_without_the_header(
    spire: DevSpire,
) -> None:
    await create(spire, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
    socket = workload_socket(spire.options.directory, "node-a")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PY_SPIFFE_CLIENT, str(socket), stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    out = json.loads(stdout)
    assert out["spiffe_id"] == out["first_svid_id"] == str(AUTHD_ID)
    chain = tuple(x509.load_der_x509_certificate(bytes.fromhex(c)) for c in out["chain"])
    bundle = X509Bundle(TD, tuple(x509.load_der_x509_certificate(bytes.fromhex(c)) for c in out["bundle"]))
    verified = verify_chain(chain, BundleSet.of([bundle]), at=now(), authorize=authorize_id(AUTHD_ID))
    assert verified == AUTHD_ID
    assert out["without_header"] == ["INVALID_ARGUMENT", "security header missing from request"]


@pytest.mark.parametrize(
    "metadata",
    [(), (("workload.spiffe.io", "True"),), (("workload.spiffe.io", "true"), ("workload.spiffe.io", "true"))],
    ids=["missing", "wrong-case", "twice"],
)
async def test_security_header_must_be_exactly_one_true(
    spire: DevSpire, metadata: tuple[tuple[str, str], ...]
) -> None:
    await create(spire, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_fetch(workload_socket(spire.options.directory, "node-a"), metadata)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "security header missing from request"


async def test_no_entry_means_permission_denied_no_identity_issued(spire: DevSpire) -> None:
    other = Selector("unix", "uid:4242424")
    await create(spire, RegistrationEntry(AUTHD_ID, PARENT, (other,)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_fetch(workload_socket(spire.options.directory, "node-a"), SECURITY_HEADER)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "no identity issued"


async def test_entry_of_another_node_is_not_issued_here() -> None:
    with short_dir() as directory:
        async with running(options(directory, nodes=("node-a", "node-b"))) as spire:
            await create(spire, RegistrationEntry(AUTHD_ID, agent_id(TD, "node-b"), (ME,)))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw_fetch(workload_socket(directory, "node-a"), SECURITY_HEADER)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            response = await raw_fetch(workload_socket(directory, "node-b"), SECURITY_HEADER)
            assert [svid.spiffe_id for svid in response.svids] == [str(AUTHD_ID)]


async def test_jwt_and_wit_methods_are_unimplemented(spire: DevSpire) -> None:
    socket = workload_socket(spire.options.directory, "node-a")
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        jwt = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            request_serializer=workload_pb2.JWTSVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.JWTSVIDResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jwt(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=SECURITY_HEADER)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        wit = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchWITSVID",
            request_serializer=workload_pb2.WITSVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.WITSVIDResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in wit(workload_pb2.WITSVIDRequest(), metadata=SECURITY_HEADER):
                pass
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert caught.value.details() == "fetching WIT-SVIDs is not implemented"


async def test_federated_bundles_follow_the_entry_federates_with() -> None:
    other = SpiffeId.parse("spiffe://example.org/other")
    with short_dir() as directory:
        async with running(options(directory, federated_trust_domain=TD.parse("partner.org"))) as spire:
            await create(
                spire, RegistrationEntry(AUTHD_ID, PARENT, (ME,), federates_with=(TD.parse("partner.org"),))
            )
            response = await raw_fetch(workload_socket(directory, "node-a"), SECURITY_HEADER)
            assert set(response.federated_bundles) == {"spiffe://partner.org"}
            await create(spire, RegistrationEntry(other, PARENT, (ME, Selector("unix", "gid:0"))))
            context = await fetch_x509_context(workload_endpoint(directory), NODE)
            assert {str(td) for td in context.bundles} == {"example.org", "partner.org"}


async def test_authd_client_holds_own_svid_sees_rotation_and_redaction(spire: DevSpire) -> None:
    (entry_id,) = await create(spire, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
    store = SvidStore()
    board = StreamBoard(lambda: None)
    backoff = CountingBackoff()
    client = WorkloadApiClient(
        workload_endpoint(spire.options.directory), store, node=NODE, backoff=backoff, status=board
    )
    with store.subscribe() as events:
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(store.wait_ready(), 10)
            own = store.own_svid()
            assert own is not None
            assert own.spiffe_id == AUTHD_ID
            verify_chain(own.chain, store, at=now(), authorize=authorize_id(AUTHD_ID))
            # SVIDs live 5 s and rotate at half-life: the stream pushes the next one.
            rotated = await next_event(events, lambda e: e.kind is EventKind.ROTATED and e.own)
            assert rotated.spiffe_id == AUTHD_ID
            newer = store.own_svid()
            assert newer is not None
            assert newer.not_before < own.not_after  # valid before the old one expires: no gap
            # The agent stops issuing the identity: PERMISSION_DENIED, and the SVID is no longer used.
            async with EntryClient(entry_socket(spire.options.directory)) as entries:
                assert [r.ok for r in await entries.delete_entries([entry_id])] == [True]
            removed = await next_event(events, lambda e: e.kind is EventKind.REMOVED and e.own)
            assert removed.spiffe_id == AUTHD_ID
            assert store.own_svid() is None
            assert "PERMISSION_DENIED 'no identity issued'" in board.down["workload-api"]
            # Registered again: the client, still retrying with backoff, gets it back.
            await create(spire, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
            await next_event(events, lambda e: e.kind is EventKind.ADDED and e.own, within=15)
            assert "workload-api" not in board.down
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_second_svid_listed_first_does_not_become_the_node_identity(spire: DevSpire) -> None:
    await register_after_a_decoy(spire.options.directory)
    store = SvidStore()
    client = WorkloadApiClient(
        workload_endpoint(spire.options.directory),
        store,
        node=NODE,
        backoff=CountingBackoff(),
        status=StreamBoard(lambda: None),
    )
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(store.wait_ready(), 10)
        own = store.own_svid()
        assert own is not None
        assert own.spiffe_id == AUTHD_ID
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_an_svid_for_the_node_id_the_client_refuses_for_good(spire: DevSpire) -> None:
    await create(spire, RegistrationEntry(SpiffeId.parse("spiffe://example.org/authd/node-b"), PARENT, (ME,)))
    store = SvidStore()
    client = WorkloadApiClient(
        workload_endpoint(spire.options.directory),
        store,
        node=NODE,
        backoff=CountingBackoff(),
        status=StreamBoard(lambda: None),
    )
    with pytest.raises(SpireError) as caught:
        await asyncio.wait_for(client.run(), 10)
    assert not caught.value.retryable
    assert "no SVID for the node ID spiffe://example.org/authd/node-a" in str(caught.value)
    assert "issued: spiffe://example.org/authd/node-b" in str(caught.value)
    assert store.own_svid() is None
