"""Endpoint ownership from host routes: what a reconcile writes and deletes."""

from __future__ import annotations

from ipaddress import ip_network

from authd.datapath.layout import ENDPOINT_F_CNI, ENDPOINT_F_ROUTE
from authd.datapath.maps import EndpointOwner
from authd.datapath.ownership import HostRoute, RouteTable, plan

LXC1, LXC2, ETH0 = 11, 12, 2
LINKS = {LXC1: "lxc1", LXC2: "lxc2", ETH0: "eth0"}
P1, P2, P3 = ip_network("10.0.1.5/32"), ip_network("fd00::5/128"), ip_network("10.0.9.9/32")


def test_host_routes_through_matching_interfaces_become_route_entries() -> None:
    table = RouteTable(LINKS, (HostRoute(P1, LXC1), HostRoute(P2, LXC2), HostRoute(P3, ETH0)))
    result = plan(table, ("lxc*",), [])
    assert result.upserts == {
        P1: EndpointOwner(LXC1, ENDPOINT_F_ROUTE),
        P2: EndpointOwner(LXC2, ENDPOINT_F_ROUTE),
    }
    assert result.deletes == []


def test_route_entries_follow_their_routes() -> None:
    table = RouteTable(LINKS, (HostRoute(P1, LXC2),))
    current = [(P1, EndpointOwner(LXC1, ENDPOINT_F_ROUTE)), (P2, EndpointOwner(LXC2, ENDPOINT_F_ROUTE))]
    result = plan(table, ("lxc*",), current)
    assert result.upserts == {P1: EndpointOwner(LXC2, ENDPOINT_F_ROUTE)}  # moved
    assert result.deletes == [P2]  # its route is gone


def test_cni_entries_stay_while_their_interface_exists() -> None:
    current = [(P1, EndpointOwner(LXC1, ENDPOINT_F_CNI)), (P2, EndpointOwner(99, ENDPOINT_F_CNI))]
    result = plan(RouteTable(LINKS, ()), ("lxc*",), current)
    assert result.upserts == {}
    assert result.deletes == [P2]  # interface 99 is gone
    # A route for the same interface adds the ROUTE flag; one for another interface leaves the CNI's record.
    routed = plan(RouteTable(LINKS, (HostRoute(P1, LXC1),)), ("lxc*",), current[:1])
    assert routed.upserts == {P1: EndpointOwner(LXC1, ENDPOINT_F_CNI | ENDPOINT_F_ROUTE)}
    elsewhere = plan(RouteTable(LINKS, (HostRoute(P1, LXC2),)), ("lxc*",), current[:1])
    assert elsewhere.upserts == {}
    assert elsewhere.deletes == []


def test_nothing_to_do_when_in_sync() -> None:
    table = RouteTable(LINKS, (HostRoute(P1, LXC1),))
    result = plan(table, ("lxc*",), [(P1, EndpointOwner(LXC1, ENDPOINT_F_ROUTE))])
    assert (result.upserts, result.deletes) == ({}, [])
