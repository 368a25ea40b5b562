"""The one place that decides what an attestation outcome means: an answer, or only a failure to ask.

An *answer* says something about the remote node and the identity: the node does not host it (once its
SVIDs have synced), or what it proved breaks a rule of the chain (:func:`authd.x509svid.verify_chain`'s
rules, "unexpected-id" among them). An answer revokes the result at once. Everything else is *transient*
("could not ask"): the channel is down or was closed, the peer's SVIDs have not synced yet ("not hosted
yet"), the peer sent something malformed. A valid result survives a transient failure until it expires.

A :class:`ViolationError` is hostile or broken input on the channel (a frame, certificate or signature that
does not parse or check out). It closes that channel and is counted by reason; for the results it is
transient, like any closed channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from authd.errors import AttestError, SvidError

NOT_HOSTED = "not-hosted"
NOT_HOSTED_YET = "not-hosted-yet"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A failed attestation of one identity: ``reason`` (a metrics label) and whether it is an answer."""

    reason: str
    answer: bool


def not_hosted(*, synced: bool) -> Outcome:
    """The peer does not host the identity: an answer once its SVIDs synced, else transient."""
    return Outcome(NOT_HOSTED, answer=True) if synced else Outcome(NOT_HOSTED_YET, answer=False)


def chain_rule(error: SvidError) -> Outcome:
    """The proved chain breaks an X509-SVID rule against the identity's bundle: an answer."""
    return Outcome(error.rule, answer=True)


def transient(reason: str) -> Outcome:
    """Anything that says nothing about whether the peer hosts the identity."""
    return Outcome(reason, answer=False)


class ViolationError(AttestError):
    """Malformed or forged input from a channel peer: the channel is closed, counted by ``reason``."""
