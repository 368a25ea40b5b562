"""A hand-written IdentityNames: fixed names for a few handles."""

from __future__ import annotations


class FakeNames:
    def __init__(self, identities: dict[int, str], nodes: dict[int, str] | None = None) -> None:
        self.identities = identities
        self.nodes = nodes or {}

    def identity_name(self, handle: int) -> str | None:
        return self.identities.get(handle)

    def node_name(self, handle: int) -> str | None:
        return self.nodes.get(handle)
