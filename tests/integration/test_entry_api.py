"""The Entry API subset (list, batch create, batch delete) against dev-spire, and dev-spire's persistence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from authd.errors import ConfigError, SpireError
from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire.dev.bundle_api import delete_federated_bundles
from authd.spire.dev.registry import agent_id, load_seed
from authd.spire.dev.service import DevSpire
from authd.spire.entries import EntryClient, RegistrationEntry, SelectorMatch
from tests.integration.devspire import TD, entry_socket, options, running, short_dir, write_entries

PARENT_A = agent_id(TD, "node-a")
PARENT_B = agent_id(TD, "node-b")
WEB = SpiffeId.parse("spiffe://example.org/web")
DB = SpiffeId.parse("spiffe://example.org/db")
UID = Selector("unix", "uid:1000")
GID = Selector("unix", "gid:1000")


async def test_create_list_delete_round_trip() -> None:
    with short_dir() as directory:
        async with (
            running(options(directory, nodes=("node-a", "node-b"))),
            EntryClient(entry_socket(directory)) as client,
        ):
            web = RegistrationEntry(WEB, PARENT_A, (UID, GID), x509_svid_ttl=300, hint="internal")
            db = RegistrationEntry(DB, PARENT_B, (UID,))
            created = await client.create_entries([web, db, web])
            assert [r.code for r in created] == [
                grpc.StatusCode.OK,
                grpc.StatusCode.OK,
                grpc.StatusCode.ALREADY_EXISTS,
            ]
            assert created[2].message == "similar entry already exists"
            assert created[2].entry is not None
            assert created[2].entry.id == created[0].id  # the existing entry comes back
            first = created[0].entry
            assert first is not None
            assert (first.spiffe_id, first.parent_id, set(first.selectors)) == (WEB, PARENT_A, {UID, GID})
            assert (first.x509_svid_ttl, first.hint) == (300, "internal")
            assert first.id
            assert first.created_at > 0

            listed = await client.list_entries()
            assert sorted(e.id for e in listed) == sorted([created[0].id, created[1].id])
            assert [e.spiffe_id for e in await client.list_entries(spiffe_id=WEB)] == [WEB]
            assert [e.spiffe_id for e in await client.list_entries(parent_id=PARENT_B)] == [DB]
            exact = await client.list_entries(selectors=[UID])
            assert [e.spiffe_id for e in exact] == [DB]
            superset = await client.list_entries(selectors=[UID], match=SelectorMatch.SUPERSET)
            assert {e.spiffe_id for e in superset} == {WEB, DB}
            subset = await client.list_entries(selectors=[GID], match=SelectorMatch.SUBSET)
            assert subset == []

            deleted = await client.delete_entries([created[0].id, created[0].id, "no-such-entry"])
            assert [r.code for r in deleted] == [
                grpc.StatusCode.OK,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.NOT_FOUND,
            ]
            assert [r.id for r in deleted] == [created[0].id, created[0].id, "no-such-entry"]
            assert [e.spiffe_id for e in await client.list_entries()] == [DB]


async def test_list_follows_pages() -> None:
    with short_dir() as directory:
        async with running(options(directory)), EntryClient(entry_socket(directory)) as client:
            entries = [
                RegistrationEntry(SpiffeId.parse(f"spiffe://example.org/w{i}"), PARENT_A, (UID,))
                for i in range(7)
            ]
            assert all(r.ok for r in await client.create_entries(entries))
            paged = await client.list_entries(page_size=3)
            assert sorted(str(e.spiffe_id) for e in paged) == sorted(str(e.spiffe_id) for e in entries)
            assert len({e.id for e in paged}) == 7


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            RegistrationEntry(SpiffeId.parse("spiffe://other.org/web"), PARENT_A, (UID,)),
            (
                'failed to convert entry: invalid spiffe ID: "spiffe://other.org/web" is not a member of '
                'trust domain "example.org"'
            ),
        ),
        (
            RegistrationEntry(WEB, SpiffeId.parse("spiffe://other.org/spire/agent/x"), (UID,)),
            (
                'failed to convert entry: invalid parent ID: "spiffe://other.org/spire/agent/x" is not a '
                'member of trust domain "example.org"'
            ),
        ),
        (RegistrationEntry(WEB, PARENT_A, ()), "failed to convert entry: selector list is empty"),
        (
            RegistrationEntry(WEB, PARENT_A, (Selector("unix:uid", "1"),)),
            "failed to convert entry: invalid selector: selector type contains ':'",
        ),
        (
            RegistrationEntry(WEB, PARENT_A, (UID,), federates_with=(TrustDomain("nowhere.org"),)),
            'failed to convert entry: unable to find federated bundle "spiffe://nowhere.org"',
        ),
        (
            RegistrationEntry(WEB, PARENT_A, (UID,), hint="x" * 1025),
            "failed to convert entry: hint is too long, max length is 1024 characters",
        ),
    ],
    ids=["foreign-id", "foreign-parent", "no-selectors", "bad-selector", "unknown-federation", "long-hint"],
)
async def test_invalid_entries_get_invalid_argument(entry: RegistrationEntry, message: str) -> None:
    with short_dir() as directory:
        async with running(options(directory)), EntryClient(entry_socket(directory)) as client:
            (result,) = await client.create_entries([entry])
            assert (result.code, result.message, result.entry) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                message,
                None,
            )
            assert await client.list_entries() == []


async def test_unreachable_server_is_a_retryable_spire_error() -> None:
    with short_dir() as directory:
        async with EntryClient(directory / "absent.sock", timeout=2) as client:
            with pytest.raises(SpireError, match="UNAVAILABLE") as caught:
                await client.list_entries()
            assert caught.value.retryable


async def test_restart_keeps_ca_and_entries() -> None:
    with short_dir() as directory:
        async with running(options(directory)) as spire:
            async with EntryClient(entry_socket(directory)) as client:
                (created,) = await client.create_entries([RegistrationEntry(WEB, PARENT_A, (UID,))])
            bundle = spire.authorities[TD].bundle()
        state = directory / "server" / "state.json"
        assert state.stat().st_mode & 0o777 == 0o600  # it holds CA private keys
        async with running(options(directory)) as restarted:
            assert restarted.authorities[TD].bundle() == bundle
            async with EntryClient(entry_socket(directory)) as client:
                assert [e.id for e in await client.list_entries()] == [created.id]


async def test_state_of_another_trust_domain_is_refused() -> None:
    with short_dir() as directory:
        async with running(options(directory)):
            pass
        with pytest.raises(ConfigError, match=r"belongs to trust domain 'example\.org'"):
            await DevSpire(options(directory, trust_domain=TrustDomain("other.org"))).start()


def test_seed_file_problems_are_all_reported(tmp_path: Path) -> None:
    seed = write_entries(
        tmp_path / "entries.toml",
        [
            {
                "spiffe_id": "spiffe://example.org/web",
                "node": "node-a",
                "selectors": ["unix:uid:1000"],
                "ttl": 60,
            },
            {"spiffe_id": "not-an-id", "node": "node-a", "selectors": ["uid1000"]},
            {"node": "node-a", "selectorz": ["unix:uid:1"]},
        ],
    )
    with pytest.raises(ConfigError) as caught:
        load_seed(seed, TD)
    problems = "\n".join(caught.value.problems)
    assert "entry[1].spiffe_id: must be a SPIFFE ID" in problems
    assert "entry[1].selectors: every selector must look like" in problems
    assert 'entry[2].selectorz: unknown key (did you mean "selectors"?)' in problems
    assert "entry[2].spiffe_id: required" in problems


def test_seed_file_entries(tmp_path: Path) -> None:
    seed = write_entries(
        tmp_path / "entries.toml",
        [
            {
                "spiffe_id": "spiffe://example.org/web",
                "node": "node-b",
                "selectors": ["unix:uid:1000"],
                "ttl": 60,
            }
        ],
    )
    (entry,) = load_seed(seed, TD)
    assert (entry.spiffe_id, entry.parent_id, entry.selectors, entry.x509_svid_ttl) == (
        WEB,
        PARENT_B,
        (UID,),
        60,
    )


def test_cli_refuses_bad_arguments_with_config_exit_status() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "authd", "dev-spire", "--dir", "/tmp/x", "--trust-domain", "Example.org"),  # noqa: S108
            *("--node", "node-a", "--node", "Bad_Node"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 78
    assert "--node 'Bad_Node'" in result.stderr
    assert "trust domain characters are limited" in result.stderr


async def test_deleting_federated_bundles_answers_per_trust_domain_like_spire() -> None:
    """The Bundle API's BatchDeleteFederatedBundle: SPIRE's code for each trust domain, in order."""
    partner, other = TrustDomain.parse("partner.org"), TrustDomain.parse("other.org")
    with short_dir() as directory:
        async with running(options(directory, federated_trust_domain=partner)) as spire:
            async with EntryClient(entry_socket(directory)) as client:
                [federating] = await client.create_entries(
                    [RegistrationEntry(WEB, PARENT_A, (UID,), federates_with=(partner,))]
                )
            refused = await delete_federated_bundles(
                entry_socket(directory), [TD.name, other.name, "Bad TD!"]
            )
            assert [code for code, _ in refused] == [
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
            ]
            [(code, message)] = await delete_federated_bundles(entry_socket(directory), [partner.name])
            assert code is grpc.StatusCode.FAILED_PRECONDITION, (
                message
            )  # RESTRICT: an entry federates with it
            assert partner in spire.authorities
            async with EntryClient(entry_socket(directory)) as client:
                await client.delete_entries([federating.id])
            assert await delete_federated_bundles(entry_socket(directory), [partner.name]) == [
                (grpc.StatusCode.OK, "OK")
            ]
            assert partner not in spire.authorities
            assert all(partner not in agent.bundles() for agent in spire.agents.values())
