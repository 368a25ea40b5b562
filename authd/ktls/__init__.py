"""Kernel TLS for pairs whose rule says ``encrypt = "ktls"``.

What is here: the start-up probe of kernel TLS and the fail-closed gate that reports on ktls rules
(:mod:`authd.ktls.support`). The datapath refuses every kTLS pair (``AUTHD_AUTH_KTLS`` in the policy map,
dropped as ENCRYPTION_UNAVAILABLE): nothing in this version carries a workload's connection into kTLS,
so the gate reports why such pairs are denied, the kernel's lack of TLS first.
"""
