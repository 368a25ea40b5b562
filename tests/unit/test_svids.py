from __future__ import annotations

import datetime as dt

import pytest

from authd.attest.channel import LocalIdentities
from authd.authmanager import SvidView
from authd.errors import SvidError
from authd.identity import SpiffeId, TrustDomain
from authd.svids import BundleOrigin, EventKind, SvidEvent, SvidStore
from authd.x509svid import BundleSource, X509Bundle
from tests.fakes.ca import NOW, LeafOptions
from tests.fakes.ca import TestCA as FakeCA

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/web")
DB = SpiffeId.parse("spiffe://example.org/db")
OWN = SpiffeId.parse("spiffe://example.org/authd/node-a")


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA.create("example.org")


def store_at(now: dt.datetime = NOW, *, needs_own: bool = True) -> SvidStore:
    return SvidStore(clock=lambda: now, needs_own=needs_own)


def is_ready(store: SvidStore) -> bool:
    return store.ready


def is_synced(store: SvidStore) -> bool:
    return store.synced


def drain(store_events: object) -> list[SvidEvent]:
    from authd.svids import Subscription  # noqa: PLC0415

    assert isinstance(store_events, Subscription)
    events = []
    while (event := store_events.get_nowait()) is not None:
        events.append(event)
    return events


async def test_ready_needs_own_svid_and_bundles(ca: FakeCA) -> None:
    store = store_at()
    assert not is_ready(store)
    store.set_own(ca.mint(str(OWN)))
    assert not is_ready(store)
    store.set_bundles(BundleOrigin.WORKLOAD_API, {TD: ca.bundle()})
    assert is_ready(store)
    await store.wait_ready()


def test_ready_without_own_when_not_needed(ca: FakeCA) -> None:
    store = store_at(needs_own=False)
    store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, {TD: ca.bundle()})
    assert store.ready


def test_local_svid_added_rotated_removed_events(ca: FakeCA) -> None:
    store = store_at()
    with store.subscribe() as events:
        first = ca.mint(str(WEB))
        assert store.set_local(WEB, first)
        assert store.set_local(WEB, first)  # same certificate: no event
        second = ca.mint(str(WEB))
        assert store.set_local(WEB, second)
        store.remove_local(WEB, "gone")
        store.remove_local(WEB, "gone again")  # nothing held: no event
        assert drain(events) == [
            SvidEvent(EventKind.ADDED, WEB),
            SvidEvent(EventKind.ROTATED, WEB),
            SvidEvent(EventKind.REMOVED, WEB),
        ]
    assert store.svid_for(WEB) is None


def test_own_svid_events_are_marked_own_and_redaction_removes_it(ca: FakeCA) -> None:
    store = store_at()
    with store.subscribe() as events:
        store.set_own(ca.mint(str(OWN)))
        store.set_own(ca.mint(str(OWN)))
        store.redact_own("PERMISSION_DENIED")
        assert [(e.kind, e.own) for e in drain(events)] == [
            (EventKind.ADDED, True),
            (EventKind.ROTATED, True),
            (EventKind.REMOVED, True),
        ]
    assert store.own_svid() is None
    assert store.stats.redactions == 1


def test_expired_svid_is_rejected_and_last_good_kept(ca: FakeCA) -> None:
    store = store_at()
    good = ca.mint(str(WEB))
    store.set_local(WEB, good)
    expired = ca.mint(str(WEB), LeafOptions(not_after=NOW - dt.timedelta(seconds=1)))
    assert not store.set_local(WEB, expired)
    assert store.svid_for(WEB) is good
    assert store.stats.rejected["delegated-identity-api", "expired"] == 1


def test_svid_under_the_wrong_id_is_rejected(ca: FakeCA) -> None:
    store = store_at()
    assert not store.set_local(WEB, ca.mint(str(DB)))
    assert store.local_svids() == {}
    assert store.stats.rejected["delegated-identity-api", "unexpected-id"] == 1


def test_reject_counts_every_one_and_logs_at_a_limited_rate(capsys: pytest.CaptureFixture[str]) -> None:
    clock = [100.0]
    store = SvidStore(clock=lambda: NOW, monotonic=lambda: clock[0])
    for _ in range(5):
        store.reject("workload-api", SvidError("malformed-certificate", "garbage"))
    store.reject("workload-api", SvidError("expired", "old"))
    clock[0] += 11
    store.reject("workload-api", SvidError("malformed-certificate", "garbage"))
    assert store.stats.rejected == {
        ("workload-api", "malformed-certificate"): 6,
        ("workload-api", "expired"): 1,
    }
    logged = [line for line in capsys.readouterr().out.splitlines() if "spire update rejected" in line]
    assert len(logged) == 3
    assert "suppressed=4" in logged[2]


def test_local_svids_is_a_snapshot(ca: FakeCA) -> None:
    store = store_at()
    store.set_local(WEB, ca.mint(str(WEB)))
    snapshot = store.local_svids()
    store.set_local(DB, ca.mint(str(DB)))
    assert set(snapshot) == {WEB}
    assert set(store.local_svids()) == {WEB, DB}


def test_bundle_changes_are_reported_per_trust_domain(ca: FakeCA) -> None:
    other = FakeCA.create("other.org")
    store = store_at()
    with store.subscribe() as events:
        store.set_bundles(
            BundleOrigin.DELEGATED_IDENTITY_API, {TD: ca.bundle(), other.trust_domain: other.bundle()}
        )
        rotated = FakeCA.create("example.org")
        two_cas = X509Bundle(TD, (ca.cert, rotated.cert))
        store.set_bundles(
            BundleOrigin.DELEGATED_IDENTITY_API, {TD: two_cas, other.trust_domain: other.bundle()}
        )
        store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, {TD: two_cas})
        assert drain(events) == [
            SvidEvent(EventKind.BUNDLE_CHANGED, trust_domain=TD),
            SvidEvent(EventKind.BUNDLE_CHANGED, trust_domain=other.trust_domain),
            SvidEvent(EventKind.BUNDLE_CHANGED, trust_domain=TD),
            SvidEvent(EventKind.BUNDLE_CHANGED, trust_domain=other.trust_domain),
        ]
    assert store.bundle_for(other.trust_domain) is None
    bundle = store.bundle_for(TD)
    assert bundle is not None
    assert bundle.authorities == (ca.cert, rotated.cert)


def test_delegated_bundles_win_over_workload_api_bundles(ca: FakeCA) -> None:
    federated = FakeCA.create("other.org")
    store = store_at()
    store.set_bundles(BundleOrigin.WORKLOAD_API, {TD: ca.bundle()})
    assert set(store.bundles().bundles) == {TD}
    store.set_bundles(
        BundleOrigin.DELEGATED_IDENTITY_API, {TD: ca.bundle(), federated.trust_domain: federated.bundle()}
    )
    store.set_bundles(BundleOrigin.WORKLOAD_API, {TD: ca.bundle()})  # later, but the lower origin
    assert set(store.bundles().bundles) == {TD, federated.trust_domain}


def test_empty_bundle_is_rejected_whole(ca: FakeCA) -> None:
    store = store_at()
    store.set_bundles(BundleOrigin.WORKLOAD_API, {TD: ca.bundle()})
    other = TrustDomain("other.org")
    assert not store.set_bundles(BundleOrigin.WORKLOAD_API, {TD: ca.bundle(), other: X509Bundle(other, ())})
    assert set(store.bundles().bundles) == {TD}
    assert store.stats.rejected["workload-api", "empty-bundle"] == 1


def test_slow_subscriber_gets_resync_instead_of_blocking_the_store(ca: FakeCA) -> None:
    store = store_at()
    slow = store.subscribe(maxsize=2)
    fast = store.subscribe(maxsize=100)
    for index in range(5):
        store.set_local(
            SpiffeId.parse(f"spiffe://example.org/w{index}"), ca.mint(f"spiffe://example.org/w{index}")
        )
    assert drain(slow) == [SvidEvent(EventKind.RESYNC)]
    assert len(drain(fast)) == 5
    assert slow.dropped == 5  # the two queued, the one that overflowed, and two while RESYNC was pending
    assert store.stats.events_dropped == 5
    store.set_local(WEB, ca.mint(str(WEB)))
    assert drain(slow) == [SvidEvent(EventKind.ADDED, WEB)]  # after RESYNC was taken, events flow again
    slow.close()
    store.remove_local(SpiffeId.parse("spiffe://example.org/w0"), "gone")
    assert drain(slow) == []


def test_store_serves_the_views_its_consumers_declare() -> None:
    store = store_at()
    # mypy checks these assignments structurally: the auth manager's and the attestation's protocols.
    views: tuple[SvidView, LocalIdentities, BundleSource] = (store, store, store)
    assert all(view is store for view in views)


def test_synced_needs_ready_and_every_workload_stream_answered(ca: FakeCA) -> None:
    store = store_at(needs_own=False)
    with store.subscribe() as events:
        store.set_local_synced(True)
        assert not is_synced(store)  # no bundles yet
        store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, {TD: ca.bundle()})
        assert is_synced(store)
        store.set_local_synced(False)
        assert not is_synced(store)
        store.set_local_synced(True)
        assert [e.kind for e in drain(events)] == [
            EventKind.SYNCED,
            EventKind.BUNDLE_CHANGED,
            EventKind.SYNCED,
        ]
