"""``authd status``: what the running daemon reports about itself, and how the CLI prints it.

The daemon answers the control socket's ``status`` op with :func:`report`, one JSON object built from the
:class:`~authd.daemonview.DaemonView` at the moment of asking: the SPIRE connection, the SVIDs held and
their expiry, the peers and the identities attested at them, auth map usage, datapath attachment, health
per component and the last warnings and errors. :func:`render` turns that object into text for a
terminal; ``--json`` prints it as it came.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from authd import __version__
from authd.daemonview import DaemonView
from authd.x509svid import X509Svid

Report = dict[str, Any]


class StatusOp:
    """Serves the control socket's ``status`` op from a :class:`DaemonView`."""

    def __init__(self, view: DaemonView, *, runtime: dict[str, str]) -> None:
        """``runtime``: where things are (config file, control socket, pin dir, metrics address)."""
        self._view = view
        self._runtime = runtime
        self._started = time.monotonic()

    async def __call__(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One response: the report."""
        del request
        yield report(self._view, runtime=self._runtime, uptime=time.monotonic() - self._started)


def report(view: DaemonView, *, runtime: dict[str, str], uptime: float = 0.0) -> Report:
    """The status of the daemon behind ``view`` as one JSON object."""
    now = view.now()
    result: Report = {
        "node": view.node,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(uptime, 1),
        "ready": view.health.is_ready,
        "healthy": view.health.healthy,
        "runtime": dict(runtime),
        "health": [
            {"name": s.name, "state": s.state.value, "reason": s.reason, "since": _iso_ts(s.since)}
            for s in view.health.snapshot()
        ],
        "spire": _spire(view),
        "svids": _svids(view, now),
        "peers": _peers(view, now),
        "auth_map": _auth_map(view),
        "datapath": _datapath(view),
        "cluster": _cluster(view),
        "encryption": _encryption(view),
        "recent": [entry.as_json() for entry in view.recent()],
    }
    return result


def _svid(svid: X509Svid, now: datetime) -> dict[str, Any]:
    return {
        "spiffe_id": str(svid.spiffe_id),
        "expires": svid.not_after.isoformat(),
        "expires_in_s": round((svid.not_after - now).total_seconds()),
    }


def _spire(view: DaemonView) -> dict[str, Any] | None:
    if view.svids is None:
        return None
    store = view.svids
    down = dict(view.streams.down) if view.streams is not None else {}
    failures = dict(view.streams.failures) if view.streams is not None else {}
    return {
        "connected": not down and store.own_svid() is not None,
        "synced": store.synced,
        "streams_down": down,
        "stream_failures": failures,
        "updates_rejected": sum(store.stats.rejected.values()),
        "trust_domains": sorted(str(td) for td in store.bundles().bundles),
    }


def _svids(view: DaemonView, now: datetime) -> dict[str, Any] | None:
    if view.svids is None:
        return None
    own = view.svids.own_svid()
    return {
        "own": _svid(own, now) if own is not None else None,
        "workloads": [_svid(svid, now) for _, svid in sorted(view.svids.local_svids().items())],
    }


def _peers(view: DaemonView, now: datetime) -> list[dict[str, Any]] | None:
    if view.attestations is None:
        return None
    peers = []
    for status in view.attestations.peers():
        entry: dict[str, Any] = {
            "spiffe_id": str(status.peer.remote_id),
            "node": status.peer.node,
            "attested": status.result is not None,
            "refused": status.refused,
            "last_failure": status.last_failure or None,
            "in_flight": status.in_flight,
        }
        if status.result is not None:
            entry["address"] = status.result.address
            entry["expires"] = status.result.not_after.isoformat()
            entry["expires_in_s"] = round((status.result.not_after - now).total_seconds())
        peers.append(entry)
    return peers


def _auth_map(view: DaemonView) -> dict[str, Any] | None:
    stats = view.auth()
    snapshot = view.datapath()
    if stats is None and snapshot is None:
        return None
    fail_closed = view.fail_closed_at()
    return {
        "entries": stats.entries if stats is not None else None,
        "capacity": snapshot.auth_capacity if snapshot is not None else None,
        "reconciles": stats.reconciles if stats is not None else None,
        "fail_closed_in_s": (
            max(round((fail_closed - view.now()).total_seconds()), 0) if fail_closed is not None else None
        ),
    }


def _datapath(view: DaemonView) -> dict[str, Any]:
    if not view.datapath_enabled:
        return {"enabled": False}
    snapshot = view.datapath()
    if snapshot is None:
        return {"enabled": True, "loaded": False}
    counters = snapshot.counters
    return {
        "enabled": True,
        "loaded": True,
        "interfaces": list(snapshot.interfaces),
        "attach_mode": snapshot.attach_mode,
        "programs_ahead": {k: list(v) for k, v in sorted(snapshot.ahead.items())},
        "reassertions": snapshot.reassertions,
        "allowed": counters.get("allowed", 0) + counters.get("allowed_auth", 0),
        "denied": sum(v for k, v in counters.items() if k.startswith("denied_")),
        "ringbuf_drops": counters.get("auth_events_lost", 0) + counters.get("flow_events_lost", 0),
    }


def _cluster(view: DaemonView) -> dict[str, Any] | None:
    if view.cluster is None:
        return None
    stats = view.cluster.stats
    since = stats.out_of_touch_since
    return {
        "version": stats.version[:12] or None,
        "applied": stats.applied,
        "rejected": stats.rejected,
        "problems": list(stats.problems)[:5],
        "held": {"version": stats.held_version[:12], "reason": stats.held_reason}
        if stats.held_version
        else None,
        "out_of_touch_s": None if since is None else int(view.now().timestamp() - since),
    }


def _encryption(view: DaemonView) -> dict[str, Any]:
    if view.tunnel is None:
        return {"mode": "off"}
    snap = view.tunnel.snapshot()
    now = snap.at

    def age(since: float | None) -> int | None:
        return None if since is None else round(now - since)

    peers = []
    for peer in snap.peers:
        device = peer.device
        handshake = device.last_handshake if device is not None else None
        peers.append({
            "node": peer.node,
            "public_key": str(peer.spec.public_key),
            "endpoint": peer.spec.endpoint_text(),
            "allowed_ips": [str(prefix) for prefix in peer.spec.allowed_ips],
            "key_age_s": age(peer.key_since),
            "psk_age_s": age(peer.psk_since),
            "handshake_age_s": age(handshake),
            "rx_bytes": device.rx_bytes if device is not None else 0,
            "tx_bytes": device.tx_bytes if device is not None else 0,
        })  # fmt: skip
    return {
        "mode": "wireguard",
        "backend": snap.backend,
        "interface": snap.interface,
        "listen_port": snap.listen_port,
        "public_key": str(snap.public_key) if snap.public_key is not None else None,
        "key_age_s": age(snap.key_since) if snap.public_key is not None else None,
        "generation": snap.generation,
        "peers": peers,
        "without_peer": list(snap.without_peer),
        "rotations": dict(snap.stats.rotations),
    }


def _iso_ts(unix: float) -> str:
    return datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- rendering


def _expiry(item: dict[str, Any]) -> str:
    seconds = int(item.get("expires_in_s", 0))
    return f"expires {item['expires']} (in {_duration(seconds)})"


def _duration(seconds: int) -> str:
    if seconds < 0:
        return f"{_duration(-seconds)} ago, EXPIRED"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def render(status: Report) -> str:
    """``status`` as text for a terminal."""
    uptime = _duration(int(status["uptime_s"]))
    ready = "ready" if status["ready"] else "starting"
    healthy = "healthy" if status["healthy"] else "UNHEALTHY (a component failed)"
    lines = [
        f"authd {status['version']} on node {status['node']} (pid {status['pid']}, up {uptime})",
        f"state:     {ready}, {healthy}",
    ]
    lines += _render_spire(status)
    lines += _render_peers(status)
    auth = status.get("auth_map")
    if auth is not None:
        lines.append(f"auth map:  {auth.get('entries', '-')} entries of {auth.get('capacity', '-')}")
        if auth.get("fail_closed_in_s") is not None:
            lines.append(
                f"           first entry expires in {_duration(auth['fail_closed_in_s'])} unless renewed"
                " (fail-closed then, if SPIRE stays down)"
            )
    lines += _render_datapath(status)
    cluster = status.get("cluster")
    if cluster is not None:
        problems = f", last problem: {cluster['problems'][0]}" if cluster.get("problems") else ""
        lines.append(
            f"cluster:   version {cluster['version'] or '(none yet)'}, {cluster['applied']} applied, "
            f"{cluster['rejected']} rejected{problems}"
        )
        if cluster.get("out_of_touch_s") is not None:
            lines.append(
                f"           OUT OF TOUCH with its store for {cluster['out_of_touch_s']}s, state kept"
            )
        held = cluster.get("held")
        if held:
            lines.append(
                f"           HELD BACK version {held['version']}: {held['reason']} "
                f"(`authd cluster accept --version {held['version']}` applies it)"
            )
    lines += render_encryption(status.get("encryption") or {"mode": "off"})
    lines.append("health:")
    for component in status["health"]:
        reason = f": {component['reason']}" if component["reason"] else ""
        lines.append(f"  {component['name']:<28} {component['state']}{reason}")
    recent = status.get("recent") or []
    lines.append(
        f"recent warnings and errors ({len(recent)}):" if recent else "recent warnings and errors: none"
    )
    for entry in recent[-10:]:
        fields = " ".join(f"{k}={v}" for k, v in entry["fields"].items())
        lines.append(f"  {entry['time']} {entry['level']:<7} {entry['event']} {fields}".rstrip())
    return "\n".join(lines)


def _render_spire(status: Report) -> list[str]:
    spire, svids = status.get("spire"), status.get("svids")
    if spire is None or svids is None:
        return ["spire:     not configured (spire.workload_socket or SPIFFE_ENDPOINT_SOCKET)"]
    if spire["connected"]:
        state = "connected" + ("" if spire["synced"] else ", workload streams not all answered yet")
    else:
        down = "; ".join(f"{name}: {reason}" for name, reason in spire["streams_down"].items())
        state = "NOT CONNECTED" + (f" ({down})" if down else "")
    lines = [f"spire:     {state}; trust domains: {', '.join(spire['trust_domains']) or '(none)'}"]
    own = svids["own"]
    lines.append(f"own SVID:  {own['spiffe_id']} {_expiry(own)}" if own else "own SVID:  none held")
    lines.append(f"workload SVIDs ({len(svids['workloads'])}):")
    lines += [f"  {svid['spiffe_id']} {_expiry(svid)}" for svid in svids["workloads"]]
    return lines


def _render_peers(status: Report) -> list[str]:
    peers = status.get("peers")
    if peers is None:
        return []
    lines = [f"peers ({sum(1 for p in peers if p['attested'])} of {len(peers)} attested):"]
    for peer in peers:
        if peer["attested"]:
            state = f"attested via {peer['address']}, {_expiry(peer)}"
        elif peer["last_failure"]:
            state = f"NOT attested: {peer['last_failure']}" + (" (refused)" if peer["refused"] else "")
        else:
            state = "attesting" if peer["in_flight"] else "not attested yet"
        lines.append(f"  {peer['spiffe_id']} at {peer['node']}: {state}")
    return lines


def _age(seconds: int | None) -> str:
    return "-" if seconds is None else _duration(seconds)


def render_encryption(encryption: Report) -> list[str]:
    """The ``encryption`` part of a status report as text (``authd status``, ``authd encryption status``)."""
    if encryption["mode"] == "off":
        return ["encryption: off"]
    if encryption["backend"] is None:
        return [f"encryption: wireguard on {encryption['interface']}, not up yet"]
    lines = [
        (
            f"encryption: wireguard ({encryption['backend']}) on {encryption['interface']}, port "
            f"{encryption['listen_port']}, key {encryption['public_key']} "
            f"(age {_age(encryption['key_age_s'])}, generation {encryption['generation']})"
        ),
        f"wireguard peers ({len(encryption['peers'])}):",
    ]
    for peer in encryption["peers"]:
        handshake = peer["handshake_age_s"]
        lines.append(
            f"  {peer['node']} {peer['endpoint']} key {peer['public_key']}, "
            f"key age {_age(peer['key_age_s'])}, psk age {_age(peer['psk_age_s'])}, "
            + (f"handshake {_duration(handshake)} ago" if handshake is not None else "no handshake yet")
            + f", rx {peer['rx_bytes']} B, tx {peer['tx_bytes']} B"
        )
    if encryption["without_peer"]:
        lines.append(f"  no keys yet from: {', '.join(encryption['without_peer'])}")
    return lines


def _render_datapath(status: Report) -> list[str]:
    datapath = status["datapath"]
    if not datapath["enabled"]:
        return ["datapath:  disabled ([datapath] enabled = false)"]
    if not datapath["loaded"]:
        return ["datapath:  not loaded yet"]
    interfaces = ", ".join(datapath["interfaces"]) or "none (check datapath.interfaces)"
    lines = [
        (
            f"datapath:  attached ({datapath['attach_mode']}) to {len(datapath['interfaces'])} interfaces: "
            f"{interfaces}"
        ),
        (
            f"verdicts:  {datapath['allowed']} allowed, {datapath['denied']} denied, "
            f"{datapath['ringbuf_drops']} events lost (ring buffers full)"
        ),
    ]
    lines += [
        f"DEGRADED:  ahead of authd on {where}: {', '.join(programs)}"
        for where, programs in datapath["programs_ahead"].items()
    ]
    if datapath["reassertions"]:
        lines.append(f"order:     authd placed itself first again {datapath['reassertions']} times")
    return lines
