"""The guest's kernel and initramfs: Debian 12's 6.12 kernel package, with the modules the tier needs.

The host kernel has no ``tls.ko`` and no ``wireguard.ko``; Debian's 6.12 image has both. The package is
the one apt's ``linux-image-6.12-amd64`` currently points at (``apt-get download``: nothing is installed
on the host). The initramfs holds a static busybox, the guest's ``/init`` (init.sh) and the modules of
``MODULES`` with everything they depend on, decompressed (busybox ``insmod`` reads plain ``.ko``) and
listed in load order (from ``depmod``'s ``modules.dep``): the guest has no ``modprobe``, so crypto
templates the kernel would otherwise request on first use (``gcm(aes)`` for kTLS) are loaded up front.

The pair is cached under ``/var/cache/authd/qemu/`` in a directory named after the kernel package, its
version and a digest of what the initramfs holds, so a new kernel, module or init script builds a new one.
A build goes to a ``.partial`` directory renamed into place when complete, under a lock, like the system
tier's root file system (tests/system/rootfs.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE = Path("/var/cache/authd/qemu")
META_PACKAGE = "linux-image-6.12-amd64"
INIT = Path(__file__).with_name("init.sh")
BUILD_TIMEOUT = 600.0

# Loaded in the guest with their dependencies. Add a module here when a guest test needs it.
MODULES = (
    "9pnet_virtio",  # the guest's root is the host's, shared over virtio 9p
    "9p",
    "overlay",  # over it, the guest's writes stay in the guest
    "tls",  # kernel TLS, and the AEAD it instantiates for AES-GCM records
    "gcm",
    "ghash-generic",
    "chacha20poly1305",  # the ChaCha20-Poly1305 AEAD kernel TLS instantiates for that suite
    "wireguard",
    "veth",  # links the tests build
    "bridge",
    "dummy",
    "tun",
    "sch_ingress",  # tc clsact and the bpf classifier (authd's datapath)
    "cls_bpf",
)


@dataclass(frozen=True)
class Image:
    """A bootable kernel and initramfs, and the kernel's release (``uname -r`` in the guest)."""

    kernel: Path
    initramfs: Path
    release: str


def kernel_package(meta: str = META_PACKAGE) -> tuple[str, str]:
    """The concrete image package (name, version) that apt's ``meta`` package depends on."""
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", meta], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(
        r"^Depends:.*?\b(linux-image-6\.12\.[\w.+-]+-amd64)\s*\(=\s*([^)\s]+)\)", shown, re.MULTILINE
    )
    if match is None:
        raise RuntimeError(f"apt's {meta} names no 6.12 image package:\n{shown}")
    return match.group(1), match.group(2)


def load_order(modules_dep: str, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to the release's module dir) in an order ``insmod`` accepts, each once.

    ``modules.dep`` lists, for each module, every module it needs, those needed last first (modprobe
    loads the list from the end).
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        module, _, needed = line.partition(":")
        deps[module] = needed.split()
        by_name[_module_name(module)] = module
    order: list[str] = []
    for name in wanted:
        found = by_name.get(_module_name(name))
        if found is None:
            raise RuntimeError(f"the guest kernel has no module {name!r}")
        for path in [*reversed(deps[found]), found]:
            if path not in order:
                order.append(path)
    return order


def _module_name(path: str) -> str:
    """``kernel/crypto/ghash-generic.ko.xz`` -> ``ghash_generic`` (the kernel treats - and _ alike)."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def image() -> tuple[Image, float | None]:
    """The cached image, built first if missing; with the build's duration in seconds (None: cached)."""
    package, version = kernel_package()
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("needs busybox (Debian busybox-static; `make system-deps`)")
    digest = hashlib.sha256(" ".join(MODULES).encode() + INIT.read_bytes() + Path(busybox).read_bytes())
    built = CACHE / f"{package}_{version}-{digest.hexdigest()[:12]}"
    if (built / "release").is_file():
        return _read(built), None
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        if (built / "release").is_file():  # built by a concurrent run while this one waited
            return _read(built), None
        started = time.monotonic()
        partial = built.with_name(built.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        _build(partial, package, Path(busybox))
        partial.rename(built)
        return _read(built), time.monotonic() - started


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read(built: Path) -> Image:
    return Image(built / "vmlinuz", built / "initrd.img", (built / "release").read_text().strip())


def _build(out: Path, package: str, busybox: Path) -> None:
    def run(*argv: str, cwd: Path = out) -> None:
        subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=BUILD_TIMEOUT)

    run("apt-get", "download", package)
    (deb,) = out.glob("*.deb")
    tree = out / "deb"
    run("dpkg-deb", "-x", str(deb), str(tree))
    deb.unlink()
    (release,) = (path.name for path in (tree / "lib/modules").iterdir())
    run("depmod", "-b", str(tree), release)
    modules = tree / "lib/modules" / release
    order = load_order((modules / "modules.dep").read_text(), MODULES)

    root = out / "initramfs"
    for directory in ("bin", "dev", "proc", "sys", "host", "modules"):
        (root / directory).mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    shutil.copy(INIT, root / "init")
    (root / "init").chmod(0o755)
    names = []
    for path in order:
        name = Path(path).name.removesuffix(".xz")
        compressed = (modules / path).read_bytes()
        (root / "modules" / name).write_bytes(
            lzma.decompress(compressed) if path.endswith(".xz") else compressed
        )
        names.append(name)
    (root / "modules/order").write_text("\n".join(names) + "\n")
    listing = subprocess.run(
        ["find", ".", "-mindepth", "1", "-print0"], cwd=root, check=True, capture_output=True
    ).stdout
    with (out / "initrd.img").open("wb") as initrd:
        subprocess.run(
            ["cpio", "--null", "--create", "--format=newc", "--quiet"],
            cwd=root,
            input=listing,
            stdout=initrd,
            check=True,
            timeout=BUILD_TIMEOUT,
        )
    shutil.copy(tree / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
    shutil.rmtree(tree)
    shutil.rmtree(root)
    (out / "release").write_text(release + "\n")
