"""The one exception hierarchy of authd.

Every error authd raises on purpose derives from :class:`AuthdError`. Modules wrap the errors of the
libraries they call at their boundary (``raise SpireError("spire: ...") from err``) so callers decide on
one family, and the message says which subsystem failed and what it was doing::

    AuthdError
    ├── ConfigError          invalid configuration; the CLI exits with EX_CONFIG (78)
    ├── SpiffeIdError        malformed SPIFFE ID or trust domain
    ├── SvidError            an X509-SVID refused; ``rule`` names the rule it broke
    ├── SpireError           a SPIRE API call failed; ``retryable`` says whether backing off can help
    ├── ClusterStateError    cluster state, or the handle state file, unreadable or invalid
    ├── EtcdError            an etcd call failed (the store unreachable, no leader, a refused txn)
    │   └── EtcdCompactedError a watch asked for history etcd has compacted away; read a fresh snapshot
    ├── DatapathError        BPF object, map, program or tc attachment failure
    ├── AttestError          an attestation handshake failed; ``reason`` is its low-cardinality label
    ├── KtlsError            a kTLS session handshake, key derivation or kernel TLS setup failed
    ├── EncryptionError      the WireGuard interface, its keys or its backend failed
    ├── ControlError         the daemon's local control socket cannot be reached or answered badly
    └── DaemonError          a critical job failed, or shutdown did not finish in time
"""

from __future__ import annotations


class AuthdError(Exception):
    """Base of every error authd raises on purpose."""


class ConfigError(AuthdError):
    """The configuration is invalid; ``problems`` lists every offending key path with what is expected."""

    def __init__(self, problems: list[str]) -> None:
        """Hold every problem found, so one run reports them all."""
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class SpiffeIdError(AuthdError):
    """A SPIFFE ID or trust domain does not follow the SPIFFE-ID specification."""


class SvidError(AuthdError):
    """An X509-SVID was refused; ``rule`` is a short stable name of the rule it broke."""

    def __init__(self, rule: str, detail: str) -> None:
        """Name the broken rule and explain it."""
        self.rule = rule
        super().__init__(f"x509svid: {rule}: {detail}")


class SpireError(AuthdError):
    """A call to a SPIRE API failed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        """Say whether retrying with backoff can succeed (per the Workload API spec's classification)."""
        self.retryable = retryable
        super().__init__(message)


class ClusterStateError(AuthdError):
    """Cluster state cannot be read or does not validate; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        """Say what failed; ``problems`` names each offending key path with what is expected."""
        self.problems = list(problems or [])
        super().__init__(message)


class EtcdError(AuthdError):
    """An etcd call failed; ``retryable`` says whether another member or a later try can succeed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        """Say what failed."""
        self.retryable = retryable
        super().__init__(message)


class EtcdCompactedError(EtcdError):
    """The revision a watch resumes from is compacted; ``compact_revision`` is the oldest one kept."""

    def __init__(self, message: str, compact_revision: int) -> None:
        """Say which revision is the oldest etcd still has."""
        self.compact_revision = compact_revision
        super().__init__(message)


class DatapathError(AuthdError):
    """Loading, attaching or using the BPF datapath failed."""


class AttestError(AuthdError):
    """An attestation between nodes failed; ``reason`` is a low-cardinality label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        """Name the failure class and explain it."""
        self.reason = reason
        super().__init__(f"attest: {reason}: {detail}")


class KtlsError(AuthdError):
    """A kTLS session could not be set up: its handshake, its keys, or kernel TLS on its socket."""


class EncryptionError(AuthdError):
    """Creating, configuring or reading the WireGuard interface, or its key file, failed."""


class ControlError(AuthdError):
    """The daemon's control socket cannot be reached, or the daemon answered badly.

    ``not_running``: nothing listens at the socket (it is missing, or stale after a crash).
    """

    def __init__(self, message: str, *, not_running: bool = False) -> None:
        """Say what failed, and whether it means the daemon is not running."""
        self.not_running = not_running
        super().__init__(message)


class DaemonError(AuthdError):
    """The daemon cannot continue: a critical job failed or shutdown timed out."""
