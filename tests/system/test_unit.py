"""systemd/authd.service under a real systemd 252 as PID 1, installed the way docs/install.md says.

The tests share one container and run in order: install, start, reload, watchdog, journal, security,
the userspace WireGuard backend, stop, and last the config error that must end the restart loop.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import pytest

from tests.system.machine import Machine

pytestmark = pytest.mark.privileged

TD = "example.org"
AUTHD_ID = f"spiffe://{TD}/authd/node-a"
SPIRE = "/run/spire-dev"
CONFIG = f"""\
[node]
name = "node-a"

[spire]
workload_socket = "{SPIRE}/node-a/public/api.sock"
admin_socket = "{SPIRE}/node-a/private/admin.sock"
server_socket = "{SPIRE}/server/api.sock"

[cluster]
file = "/etc/authd/cluster.toml"

[attest]
listen_address = "127.0.0.1"

[datapath]
interfaces = ["lxc*"]

[http]
listen_address = "127.0.0.1"
port = 9464
"""
CLUSTER = f"""\
trust_domain = "{TD}"

[[node]]
name = "node-a"
addresses = ["127.0.0.1"]
spiffe_id = "{AUTHD_ID}"

[[endpoint]]
spiffe_id = "spiffe://{TD}/ns/demo/sa/web"
node = "node-a"
prefixes = ["10.1.0.5"]
selectors = ["unix:uid:1000"]

[[policy]]
source = "*"
destination = "spiffe://{TD}/ns/demo/sa/web"
"""
ENTRIES = f"""\
[[entry]]
spiffe_id = "{AUTHD_ID}"
node = "node-a"
selectors = ["unix:uid:0"]
"""
# The SPIRE agent of docs/install.md, played by dev-spire (DESIGN.md: the one stand-in).
SPIRE_UNIT = f"""\
[Unit]
Description=SPIRE stand-in (authd dev-spire) as the node's agent
[Service]
ExecStart=/opt/authd/bin/authd dev-spire --dir {SPIRE} --trust-domain {TD} --node node-a \
--entries /etc/authd/dev-entries.toml --authorized-delegate {AUTHD_ID}
"""
# Only for the test: a watchdog that fires in seconds, not 30 s, and a quick abort.
WATCHDOG_DROP_IN = "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\n"
EXPOSURE = re.compile(r"Overall exposure level for authd\.service: (\d+\.\d+)")


def show(machine: Machine, *properties: str) -> dict[str, str]:
    out = machine.run("systemctl", "show", "authd", *(f"--property={p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def attached(machine: Machine) -> bool:
    """Whether a program runs on lxc0's ingress hook (tcx, as authd attaches on this kernel)."""
    probe = (
        "import socket\n"
        "from authd.datapath import tcx\n"
        "print(len(tcx.query(socket.if_nametoindex('lxc0'), tcx.BPF_TCX_INGRESS)))\n"
    )
    return machine.run("/opt/authd/bin/python", "-c", probe).stdout.strip() not in ("", "0")


def readyz(machine: Machine) -> int:
    probe = (
        "import urllib.request, urllib.error\n"
        "try: print(urllib.request.urlopen('http://127.0.0.1:9464/readyz', timeout=5).status)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n"
    )
    return int(machine.run("python3", "-c", probe).stdout)


def journal(machine: Machine, *args: str) -> list[dict[str, str]]:
    out = machine.run("journalctl", "--unit=authd", "--output=json", "--no-pager", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def wait(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {within}s: {what}")


def test_install_as_documented(machine: Machine) -> None:
    # docs/install.md, section 1: the venv, the wheel (offline, from a wheelhouse), authd on PATH.
    machine.run("python3", "-m", "venv", "/opt/authd")
    offline = "--no-index --find-links /wheels/deps"  # the container has no network: a wheelhouse
    machine.run("sh", "-c", f"/opt/authd/bin/pip install -q {offline} /wheels/authd/authd-*.whl", timeout=300)
    machine.run("ln", "-s", "/opt/authd/bin/authd", "/usr/local/bin/authd")
    assert machine.run("authd", "--version").stdout.startswith("authd ")
    # Section 2: /etc/authd with the config and cluster state.
    machine.run("install", "-d", "-m", "0755", "/etc/authd")
    machine.write("/etc/authd/authd.toml", CONFIG)
    machine.write("/etc/authd/cluster.toml", CLUSTER)
    machine.run("authd", "config", "check", "--config", "/etc/authd/authd.toml")
    machine.run("authd", "cluster", "check", "--config", "/etc/authd/authd.toml")
    # Section 3: the unit.
    machine.run("cp", "/opt/authd/share/authd/systemd/authd.service", "/etc/systemd/system/")
    machine.write("/etc/systemd/system/authd.service.d/test-watchdog.conf", WATCHDOG_DROP_IN)
    machine.write("/etc/authd/dev-entries.toml", ENTRIES)
    machine.write("/etc/systemd/system/spire-agent.service", SPIRE_UNIT)
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "start", "spire-agent")
    wait(lambda: machine.run("test", "-S", f"{SPIRE}/node-a/private/admin.sock", check=False).returncode == 0,
         30, "dev-spire's sockets")  # fmt: skip
    # A workload-facing interface for the datapath to attach to.
    machine.run("ip", "link", "add", "lxc0", "type", "veth", "peer", "name", "pod0")
    machine.run("ip", "link", "set", "lxc0", "up")


def test_start_returns_once_ready(machine: Machine, timings: dict[str, float]) -> None:
    started = time.monotonic()
    machine.run("systemctl", "start", "authd", timeout=130)
    timings["systemctl start authd -> active, s"] = time.monotonic() - started
    state = show(machine, "ActiveState", "SubState", "StatusText")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # No waiting: READY=1 is sent at the moment /readyz turns 200, and start returned only after it.
    assert readyz(machine) == 200
    assert attached(machine)
    assert machine.run("authd", "status").returncode == 0


def test_the_daemon_has_exactly_the_units_privileges(machine: Machine) -> None:
    status = machine.run("cat", f"/proc/{show(machine, 'MainPID')['MainPID']}/status").stdout
    assert re.search(r"CapEff:\s+000000c000001000", status), status  # CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF
    assert re.search(r"NoNewPrivs:\s+1", status), status
    assert re.search(r"Seccomp:\s+2", status), status
    # Everything but the pin directory under /sys is read-only for it (ProtectKernelTunables=yes).
    mounts = machine.run("cat", f"/proc/{show(machine, 'MainPID')['MainPID']}/mountinfo").stdout
    pins = [line for line in mounts.splitlines() if " /sys/fs/bpf/authd " in line]
    assert pins, mounts
    assert " rw," in pins[0]


def test_reload_applies_a_good_config_and_refuses_a_bad_one(machine: Machine) -> None:
    pid = show(machine, "MainPID")["MainPID"]
    machine.write("/etc/authd/authd.toml", CONFIG + '\n[log]\nlevel = "debug"\n')
    machine.run("systemctl", "reload", "authd")
    assert any(e["MESSAGE"].startswith("config reloaded") for e in journal(machine, "--since=-30s"))

    machine.write("/etc/authd/authd.toml", CONFIG + "\n[daemon]\nshutdown_timeuot = 1\n")
    refused = machine.run("systemctl", "reload", "authd", check=False)
    assert refused.returncode != 0
    assert show(machine, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    reasons = machine.run("journalctl", "--unit=authd", "--no-pager", "--since=-30s").stdout
    assert "daemon.shutdown_timeuot: unknown key" in reasons
    assert readyz(machine) == 200
    # A reload that drops the interface pattern detaches, without CAP_SYS_ADMIN to look programs up.
    machine.write("/etc/authd/authd.toml", CONFIG.replace('["lxc*"]', '["none*"]'))
    machine.run("systemctl", "reload", "authd")
    wait(lambda: not attached(machine), 10, "detached from lxc0")
    machine.write("/etc/authd/authd.toml", CONFIG)
    machine.run("systemctl", "reload", "authd")
    wait(lambda: attached(machine), 10, "attached to lxc0 again")


def test_journal_has_priorities_and_fields(machine: Machine) -> None:
    warnings = journal(machine, "--priority=warning")
    ours = [e for e in warnings if e.get("SYSLOG_IDENTIFIER") == "authd"]
    # A fresh node has no handle state: authd flushes the auth map and warns.
    flushed = [e for e in ours if e["MESSAGE"].startswith("no identity handle state")]
    assert flushed, [e["MESSAGE"] for e in warnings]
    assert flushed[0]["PRIORITY"] == "4"
    assert "AUTHD_ENTRIES" in flushed[0]
    assert not [e for e in ours if int(e["PRIORITY"]) > 4]  # -p warning: nothing at info or debug
    ready = [e for e in journal(machine) if e["MESSAGE"].startswith("authd ready")]
    assert ready
    assert ready[0]["PRIORITY"] == "6"


def test_watchdog_restarts_a_stopped_daemon(machine: Machine) -> None:
    pid = show(machine, "MainPID")["MainPID"]
    machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "authd")

    def restarted() -> bool:
        state = show(machine, "MainPID", "ActiveState")
        return state["ActiveState"] == "active" and state["MainPID"] not in {pid, "0"}

    wait(restarted, 60, "a new authd after the watchdog fired")
    assert any("Watchdog timeout" in e["MESSAGE"] for e in journal(machine, "--output-fields=MESSAGE"))
    wait(lambda: readyz(machine) == 200, 60, "/readyz 200 after the restart")


def test_online_security_matches_offline(machine: Machine, timings: dict[str, float]) -> None:
    online = machine.run("systemd-analyze", "security", "authd", check=False).stdout
    offline = machine.run(
        "systemd-analyze", "security", "--offline=yes", "/etc/systemd/system/authd.service", check=False
    ).stdout
    online_level, offline_level = EXPOSURE.search(online), EXPOSURE.search(offline)
    assert online_level is not None, online
    assert offline_level is not None, offline
    assert online_level.group(1) == offline_level.group(1)
    timings["systemd-analyze security authd (online), exposure"] = float(online_level.group(1))
    assert float(online_level.group(1)) <= 2.0


def test_the_userspace_wireguard_backend_runs_under_the_unit(machine: Machine) -> None:
    """wireguard-go under the unit's sandbox: its socket in the unit's /run/wireguard, /dev/net/tun, its
    process in the unit's cgroup, and the unit's exposure unchanged."""
    machine.write(
        "/etc/authd/authd.toml", CONFIG + '\n[encryption]\nmode = "wireguard"\nbackend = "userspace"\n'
    )
    try:
        machine.run("systemctl", "restart", "authd", timeout=90)

        def up() -> bool:
            report = json.loads(machine.run("authd", "status", "--json", check=False).stdout or "{}")
            encryption = report.get("encryption") or {}
            return encryption.get("backend") == "userspace" and encryption.get("public_key") is not None

        wait(up, 60, "the encryption job up on wireguard-go")
        assert machine.run("ip", "link", "show", "authd-wg0").returncode == 0
        probe = (
            "import pathlib\n"
            "for p in pathlib.Path('/proc').glob('[0-9]*'):\n"
            "    if (p / 'comm').read_text().strip() == 'wireguard-go': print((p / 'cgroup').read_text())\n"
        )
        cgroups = machine.run("python3", "-c", probe).stdout.split()
        assert any(line.endswith(":/system.slice/authd.service") for line in cgroups), cgroups  # the unit's
        # The host's /run/wireguard (the container's) holds no socket: wireguard-go's is the unit's own.
        assert machine.run("test", "-e", "/run/wireguard/authd-wg0.sock", check=False).returncode != 0
        online = EXPOSURE.search(machine.run("systemd-analyze", "security", "authd", check=False).stdout)
        assert online is not None
        assert float(online.group(1)) <= 2.0
    finally:
        machine.write("/etc/authd/authd.toml", CONFIG)
        machine.run("systemctl", "restart", "authd", timeout=90)
    assert machine.run("ip", "link", "show", "authd-wg0", check=False).returncode != 0  # went with the unit


def test_stop_within_its_timeout_leaves_programs_enforcing(machine: Machine) -> None:
    follower = machine.popen("authd", "observe", "--follow")
    try:
        time.sleep(1)  # connected
        started = time.monotonic()
        machine.run("systemctl", "stop", "authd", timeout=60)
        took = time.monotonic() - started
        _, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert took < 20, took  # TimeoutStopSec=20s
    assert show(machine, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert follower.returncode == 1
    assert "the daemon closed the flow stream" in err
    assert attached(machine)
    assert machine.run("authd", "bpf", "counters").returncode == 0


def test_a_config_error_ends_the_restart_loop(machine: Machine) -> None:
    machine.write("/etc/authd/authd.toml", CONFIG + "\n[daemon]\nshutdown_timeuot = 1\n")
    assert machine.run("systemctl", "start", "authd", check=False, timeout=60).returncode != 0
    time.sleep(5)  # RestartSec=2s: a restart would have happened by now
    state = show(machine, "ActiveState", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "ExecMainStatus": "78", "NRestarts": "0"}, state
