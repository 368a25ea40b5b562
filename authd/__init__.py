"""authd: sidecar-free mutual authentication for SPIRE-backed clusters, enforced in the kernel."""

__version__ = "0.1.0"
