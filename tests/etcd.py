"""Real etcd members for tests (Debian's etcd-server): loopback only, free ports, temporary data dirs.

``EtcdCluster`` starts one or three members, can stop and restart each, and always kills every member
it started when closed, even after a failed test. With ``tls``, members serve https only and require a
client certificate that chains to the CA (``--client-cert-auth``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from authd.cluster._proto import etcd_pb2 as pb

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdTls:
    """PEM files: the CA clients and members trust, the members' server pair, a client pair."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    def flags(self) -> list[str]:
        return [
            f"--cert-file={self.cert_file}",
            f"--key-file={self.key_file}",
            f"--trusted-ca-file={self.ca_file}",
            "--client-cert-auth",
        ]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca_file.read_bytes(), self.client_key_file.read_bytes(), self.client_cert_file.read_bytes()
        )


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    directory: Path
    size: int = 1
    tls: EtcdTls | None = None
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        scheme = "http" if self.tls is None else "https"
        for index in range(self.size):
            name = f"m{index}"
            self.members.append(Member(name, free_port(), free_port(), self.directory / name, scheme=scheme))

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(member.client_url for member in self.members)

    def start(self) -> EtcdCluster:
        for member in self.members:
            self.start_member(member, initial=True)
        self.wait_healthy()
        return self

    def start_member(self, member: Member, *, initial: bool = False) -> None:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        log = (self.directory / f"{member.name}.log").open("ab")
        member.process = subprocess.Popen(
            [
                ETCD,
                f"--name={member.name}",
                f"--data-dir={member.data_dir}",
                f"--listen-client-urls={member.client_url}",
                f"--advertise-client-urls={member.client_url}",
                f"--listen-peer-urls={member.peer_url}",
                f"--initial-advertise-peer-urls={member.peer_url}",
                f"--initial-cluster={cluster}",
                f"--initial-cluster-state={'new' if initial else 'existing'}",
                "--initial-cluster-token=authd-test",
                "--heartbeat-interval=50",
                "--election-timeout=500",
                "--max-txn-ops=20000",
                "--max-request-bytes=16777216",
                "--logger=zap",
                "--log-level=error",
                *(self.tls.flags() if self.tls is not None else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def stop_member(self, member: Member) -> None:
        if member.process is not None:
            member.process.kill()
            member.process.wait(timeout=10)
            member.process = None

    def close(self) -> None:
        for member in self.members:
            self.stop_member(member)

    def status(self, member: Member) -> pb.StatusResponse | None:
        target = f"127.0.0.1:{member.client_port}"
        with (
            grpc.insecure_channel(target)
            if self.tls is None
            else grpc.secure_channel(target, self.tls.credentials())
        ) as channel:
            method = channel.unary_unary(
                "/etcdserverpb.Maintenance/Status",
                request_serializer=pb.StatusRequest.SerializeToString,
                response_deserializer=pb.StatusResponse.FromString,
            )
            try:
                response: pb.StatusResponse = method(pb.StatusRequest(), timeout=1)
            except grpc.RpcError:
                return None
            return response

    def leader(self) -> Member | None:
        for member in self.members:
            if member.process is None:
                continue
            status = self.status(member)
            if status is not None and status.leader and status.leader == status.header.member_id:
                return member
        return None

    def wait_healthy(self, timeout: float = 30) -> Member:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if member.process is not None and member.process.poll() is not None:
                    log = (self.directory / f"{member.name}.log").read_text()
                    raise RuntimeError(f"etcd member {member.name} exited: {log[-2000:]}")
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        raise TimeoutError("etcd has no leader")
