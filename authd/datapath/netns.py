"""Running a function inside another network namespace, on a thread of its own.

libbpf's tc helpers and interface-index lookups act in the calling thread's network namespace. Joining
one with ``setns(CLONE_NEWNET)`` changes only the network namespace, unlike ``ip netns exec`` which also
makes a mount namespace where ``/sys/fs/bpf`` is empty. The thread exits afterwards, so no other code
ever runs in the joined namespace by accident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def run_in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """Call ``fn`` on a fresh thread joined to the network namespace at ``netns`` and return its result."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(fn())
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(err)

    thread = threading.Thread(target=target, name=f"netns:{netns.name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
