"""Loading the BPF object idempotently, attaching it to interfaces, and unloading it.

A restarted authd opens the same object with the same pin root: libbpf reuses every pinned map (entries
survive). The new programs replace the pinned ones (``progs/``), and attaching swaps the program of each
pinned tcx link in place (or, on kernels without tcx, replaces the tc filter at authd's handle), so
enforcement has no gap and no link is created twice (:mod:`.attach`). Stopping authd detaches nothing;
only :func:`remove_pins` (``authd bpf unload``) removes the links, the programs and the pins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import structlog

from authd.datapath import attach, libbpf, syscalls, tcx
from authd.datapath.attach import Attached, Attacher, AttachMode
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


def _load_object(pin_dir: Path, sizes: MapSizes, path: Path | None) -> tuple[libbpf.BpfObject, bool]:
    """Open and load the object, reusing the pinned maps; also return whether any pin was reused."""
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
    return obj, reused


class Datapath:
    """The loaded object: its programs' fds for attaching, and its pinned maps."""

    def __init__(
        self, obj: libbpf.BpfObject, pin_dir: Path, *, reused: bool, mode: AttachMode, sizes: MapSizes
    ) -> None:
        """Wrap a loaded object whose programs are pinned; use :meth:`load`."""
        self._obj = obj
        self.pin_dir = pin_dir
        self.reused = reused
        self._sizes = sizes
        self.attacher = Attacher(pin_dir, mode=mode)
        self._spare: libbpf.BpfObject | None = None
        self.attachments: dict[int, Attached] = {}

    @classmethod
    def load(
        cls, pin_dir: Path, sizes: MapSizes, *, path: Path | None = None, mode: AttachMode = AttachMode.AUTO
    ) -> Datapath:
        """Open the object, reuse or create the pinned maps, load and pin the programs (nothing attached)."""
        ensure_bpffs(pin_dir)
        obj, reused = _load_object(pin_dir, sizes, path)
        try:
            attach.pin_programs(pin_dir, {name: obj.prog_fd(name) for name in ProgramName})
            datapath = cls(obj, pin_dir, reused=reused, mode=mode, sizes=sizes)
        except BaseException:
            obj.close()
            raise
        log.info("datapath loaded", pin_dir=str(pin_dir), reused_pins=reused)
        return datapath

    def spare_programs(self) -> dict[ProgramName, int]:
        """Second instances of the programs (same maps), loaded on first use (for reasserting first place)."""
        if self._spare is None:
            self._spare, _ = _load_object(self.pin_dir, self._sizes, None)
        return {name: self._spare.prog_fd(name) for name in ProgramName}

    def attach(self, ifindex: int, *, l3: bool) -> Attached:
        """Attach (or atomically update) authd's programs on both hooks of ``ifindex``.

        Acts in the calling thread's network namespace.
        """
        attached = self.attacher.attach(ifindex, l3=l3)
        self.attachments[ifindex] = attached
        return attached

    def detach(self, ifindex: int) -> bool:
        """Remove authd's programs from ``ifindex``; whether any were there."""
        self.attachments.pop(ifindex, None)
        return self.attacher.detach(ifindex)

    def configure(self, config: RuntimeConfig) -> None:
        """Write the runtime settings the programs read on every packet."""
        handle = MapHandle(os.dup(self._obj.map_fd(MapName.CONFIG)))
        try:
            ConfigMap(handle).write(config)
        finally:
            handle.close()

    def runtime_config(self) -> RuntimeConfig:
        """The runtime settings the config map holds now (a reused pin keeps the last run's)."""
        handle = MapHandle(os.dup(self._obj.map_fd(MapName.CONFIG)))
        try:
            return ConfigMap(handle).read()
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

    def close(self) -> None:
        """Release the object's fds. Attached programs keep running with the pinned maps."""
        self.attacher.close()
        if self._spare is not None:
            self._spare.close()
        self._obj.close()


def attached_prog_ids(ifindex: int) -> tuple[int | None, int | None]:
    """The ids of authd's programs on (ingress, egress) of ``ifindex``: its tcx link's, else its tc filter's.

    Looks programs up by id, which needs CAP_SYS_ADMIN (tests and the CLI as root).
    """
    found: list[int | None] = []
    for tcx_type, point in (
        (tcx.BPF_TCX_INGRESS, libbpf.BPF_TC_INGRESS),
        (tcx.BPF_TCX_EGRESS, libbpf.BPF_TC_EGRESS),
    ):
        try:
            entries = tcx.query(ifindex, tcx_type)
        except OSError:
            entries = []
        ids = [entry.prog_id for entry in entries if _is_authd_prog(entry.prog_id)]
        found.append(
            ids[0] if ids else libbpf.tc_query(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY)
        )
    return found[0], found[1]


def _is_authd_prog(prog_id: int) -> bool:
    try:
        fd = syscalls.prog_fd_by_id(prog_id)
    except OSError:
        return False
    try:
        return syscalls.prog_info(fd).name in {str(p) for p in ProgramName}
    finally:
        os.close(fd)


def detach_tc(ifindex: int) -> bool:
    """Remove authd's tc filters from ``ifindex`` (calling thread's netns); return whether any were there.

    Only filters at authd's handle and priority that run an authd program are removed; the clsact qdisc
    stays, since other filters may use it. tcx links go with their pins (:func:`remove_pins`).
    """
    removed = False
    for point in (libbpf.BPF_TC_INGRESS, libbpf.BPF_TC_EGRESS):
        prog_id = libbpf.tc_query(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY)
        if prog_id is not None and _is_authd_prog(prog_id):
            removed = libbpf.tc_detach(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY) or removed
    return removed


def _detach_pinned_links(links: Path) -> list[str]:
    """Detach every link pinned in ``links`` (whatever namespace its interface is in) and unpin it."""
    removed = []
    for path in sorted(links.iterdir()) if links.is_dir() else ():
        try:
            fd = syscalls.obj_get(path)
        except OSError as err:
            raise DatapathError(f"datapath: cannot open {path}: {err.strerror}") from err
        try:
            tcx.link_detach(fd)
        except OSError as err:
            if err.errno != errno.ENOLINK:  # defunct: its interface is gone
                raise DatapathError(f"datapath: cannot detach {path}: {err.strerror}") from err
        finally:
            os.close(fd)
        path.unlink()
        removed.append(f"{attach.LINKS_DIR}/{path.name}")
    return removed


def remove_pins(pin_dir: Path) -> list[str]:
    """Detach and unpin authd's tcx links, unpin its programs and maps, remove the directories if empty.

    Return what was removed.
    """
    removed = _detach_pinned_links(pin_dir / attach.LINKS_DIR)
    pins = [Path(attach.PROGS_DIR) / name for name in ProgramName] + [Path(name) for name in MapName]
    for name in pins:
        try:
            (pin_dir / name).unlink()
            removed.append(str(name))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise DatapathError(f"datapath: cannot remove pin {pin_dir / name}: {err.strerror}") from err
    for directory in (pin_dir / attach.LINKS_DIR, pin_dir / attach.PROGS_DIR, pin_dir):
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("pin directory not removed", pin_dir=str(directory), error=err.strerror)
    return removed
