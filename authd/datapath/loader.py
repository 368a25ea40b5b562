"""Loading the BPF object idempotently, attaching it to interfaces, and unloading it.

A restarted authd opens the same object with the same pin root: libbpf reuses every pinned map (entries
survive), and attaching with BPF_TC_F_REPLACE at authd's fixed tc handle and priority swaps the program in
place, so enforcement has no gap. Stopping authd detaches nothing; only :func:`unload` (``authd bpf
unload``) removes the programs and the pins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import structlog

from authd.datapath import libbpf, syscalls
from authd.datapath.layout import TC_HANDLE, TC_PRIORITY, MapName, ProgramName
from authd.datapath.maps import ConfigMap, PinnedMaps, RuntimeConfig
from authd.datapath.syscalls import MapHandle
from authd.errors import DatapathError

log = structlog.get_logger(__name__)

BPFFS_ROOT = Path("/sys/fs/bpf")

# Link types without an Ethernet header (skb data starts at the IP header): wireguard and tun
# (ARPHRD_NONE), IP-in-IP and GRE tunnels, raw IP, PPP.
_L3_LINK_TYPES = frozenset({65534, 768, 769, 776, 778, 823, 519, 512})


def object_path() -> Path:
    """The BPF object shipped inside the package (built by ``make artifacts``)."""
    return Path(str(resources.files("authd.datapath") / "authd.bpf.o"))


def is_l3_link(link_type: int) -> bool:
    """Whether a link of this ARPHRD type carries packets without an Ethernet header."""
    return link_type in _L3_LINK_TYPES


@dataclass(frozen=True, slots=True)
class MapSizes:
    """Configured map sizes; a map pinned with another size keeps its size until ``authd bpf unload``."""

    ipcache: int
    policy: int
    auth: int
    events_bytes: int
    flows: int


def _mounted_fs_type(path: Path) -> str | None:
    """File system type of the mount that holds ``path`` (the last, i.e. topmost, for stacked mounts)."""
    best: tuple[int, str] | None = None
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        mount_point = fields[4].replace("\\040", " ")
        fs_type = fields[fields.index("-") + 1]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fs_type)
    return best[1] if best else None


def ensure_bpffs(pin_dir: Path) -> None:
    """Mount bpffs at /sys/fs/bpf when ``pin_dir`` is under it and it is not mounted; create ``pin_dir``."""
    if _mounted_fs_type(pin_dir) != "bpf":
        if pin_dir != BPFFS_ROOT and BPFFS_ROOT not in pin_dir.parents:
            raise DatapathError(f"datapath: pin_dir {pin_dir} is not on a mounted bpf file system")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.mount(b"bpf", bytes(BPFFS_ROOT), b"bpf", 0, b"mode=0700") != 0:
            err = ctypes.get_errno()
            raise DatapathError(f"datapath: cannot mount bpffs at {BPFFS_ROOT}: {os.strerror(err)}")
        log.info("mounted bpffs", path=str(BPFFS_ROOT))
    try:
        pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise DatapathError(f"datapath: cannot create pin_dir {pin_dir}: {err.strerror}") from err


def _pinned_max_entries(pin_dir: Path, name: MapName) -> int | None:
    try:
        fd = syscalls.obj_get(pin_dir / name)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DatapathError(f"datapath: cannot open {pin_dir / name}: {err.strerror}") from err
    try:
        return syscalls.map_info(fd).max_entries
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Attachment:
    """authd's programs on one interface."""

    ifindex: int
    ingress_prog_id: int
    egress_prog_id: int


class Datapath:
    """The loaded object: its programs' fds for attaching, and its pinned maps."""

    def __init__(self, obj: libbpf.BpfObject, pin_dir: Path, *, reused: bool) -> None:
        """Wrap a loaded object; use :meth:`load`."""
        self._obj = obj
        self.pin_dir = pin_dir
        self.reused = reused
        self.attachments: dict[int, Attachment] = {}

    @classmethod
    def load(cls, pin_dir: Path, sizes: MapSizes, *, path: Path | None = None) -> Datapath:
        """Open the object, reuse or create the pinned maps, load the programs (nothing is attached)."""
        ensure_bpffs(pin_dir)
        path = path or object_path()
        if not path.is_file():
            raise DatapathError(f"datapath: BPF object {path} is missing: build it with `make artifacts`")
        obj = libbpf.BpfObject(path, pin_root=pin_dir)
        try:
            wanted = {
                MapName.IPCACHE: sizes.ipcache,
                MapName.POLICY: sizes.policy,
                MapName.AUTH: sizes.auth,
                MapName.EVENTS: sizes.events_bytes,
                MapName.FLOWS: sizes.flows,
            }
            reused = False
            for name, size in wanted.items():
                pinned = _pinned_max_entries(pin_dir, name)
                reused = reused or pinned is not None
                if pinned is not None and pinned != size:
                    # Recreating the map would drop its entries (and enforcement with them).
                    log.warning(
                        "pinned map keeps its size until `authd bpf unload`",
                        map=str(name),
                        pinned=pinned,
                        configured=size,
                    )
                    size = pinned  # noqa: PLW2901 - the size actually used
                obj.set_max_entries(name, size)
            obj.load()
        except BaseException:
            obj.close()
            raise
        log.info("datapath loaded", pin_dir=str(pin_dir), reused_pins=reused)
        return cls(obj, pin_dir, reused=reused)

    def configure(self, config: RuntimeConfig) -> None:
        """Write the runtime settings the programs read on every packet."""
        handle = MapHandle(os.dup(self._obj.map_fd(MapName.CONFIG)))
        try:
            ConfigMap(handle).write(config)
        finally:
            handle.close()

    def events_fd(self) -> int:
        """The flow events ring buffer's fd (owned by the object: dup it to keep it)."""
        return self._obj.map_fd(MapName.EVENTS)

    def auth_events_fd(self) -> int:
        """The auth-required events ring buffer's fd (owned by the object: dup it to keep it)."""
        return self._obj.map_fd(MapName.AUTH_EVENTS)

    def prog_fd(self, name: ProgramName) -> int:
        """A loaded program's fd (owned by the object)."""
        return self._obj.prog_fd(name)

    def maps(self) -> PinnedMaps:
        """Open the pinned maps (the caller closes them)."""
        return PinnedMaps(self.pin_dir)

    def attach(self, ifindex: int, *, l3: bool) -> Attachment:
        """Attach (or atomically replace) authd's programs on both hooks of ``ifindex``.

        Acts in the calling thread's network namespace.
        """
        ingress = ProgramName.INGRESS_L3 if l3 else ProgramName.INGRESS
        egress = ProgramName.EGRESS_L3 if l3 else ProgramName.EGRESS
        attached = Attachment(
            ifindex,
            libbpf.tc_attach(
                ifindex,
                libbpf.BPF_TC_INGRESS,
                self._obj.prog_fd(ingress),
                handle=TC_HANDLE,
                priority=TC_PRIORITY,
            ),
            libbpf.tc_attach(
                ifindex,
                libbpf.BPF_TC_EGRESS,
                self._obj.prog_fd(egress),
                handle=TC_HANDLE,
                priority=TC_PRIORITY,
            ),
        )
        self.attachments[ifindex] = attached
        return attached

    def close(self) -> None:
        """Release the object's fds. Attached programs keep running with the pinned maps."""
        self._obj.close()


def attached_prog_ids(ifindex: int) -> tuple[int | None, int | None]:
    """The ids of the programs at authd's tc handle and priority on (ingress, egress) of ``ifindex``."""
    return (
        libbpf.tc_query(ifindex, libbpf.BPF_TC_INGRESS, handle=TC_HANDLE, priority=TC_PRIORITY),
        libbpf.tc_query(ifindex, libbpf.BPF_TC_EGRESS, handle=TC_HANDLE, priority=TC_PRIORITY),
    )


def _is_authd_prog(prog_id: int) -> bool:
    try:
        fd = syscalls.prog_fd_by_id(prog_id)
    except OSError:
        return False
    try:
        return syscalls.prog_info(fd).name in {str(p) for p in ProgramName}
    finally:
        os.close(fd)


def detach(ifindex: int, *, ours: Collection[int] = ()) -> bool:
    """Remove authd's programs from ``ifindex`` (calling thread's netns); return whether any were there.

    Only filters at authd's handle and priority that run an authd program are removed; the clsact qdisc
    stays, since other filters may use it. ``ours``: ids of programs this process attached, known to be
    authd's without asking the kernel (which needs CAP_SYS_ADMIN for a program by id; the unit lacks it).
    """
    removed = False
    for point in (libbpf.BPF_TC_INGRESS, libbpf.BPF_TC_EGRESS):
        prog_id = libbpf.tc_query(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY)
        if prog_id is not None and (prog_id in ours or _is_authd_prog(prog_id)):
            removed = libbpf.tc_detach(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY) or removed
    return removed


def remove_pins(pin_dir: Path) -> list[str]:
    """Unpin every authd map under ``pin_dir`` and remove the directory if empty; return what was removed."""
    removed = []
    for name in MapName:
        try:
            (pin_dir / name).unlink()
            removed.append(str(name))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise DatapathError(f"datapath: cannot remove pin {pin_dir / name}: {err.strerror}") from err
    try:
        pin_dir.rmdir()
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("pin directory not removed", pin_dir=str(pin_dir), error=err.strerror)
    return removed
