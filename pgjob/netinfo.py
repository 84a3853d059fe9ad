"""This node's addresses and networks, as the cluster sees them."""
from __future__ import annotations

import ipaddress
import socket

import psutil

from .errors import ServerFailed, UsageError

_VIRTUAL = ("docker", "virbr", "veth", "br-", "cni", "flannel", "podman")


def _interfaces() -> dict[str, list[ipaddress.IPv4Interface]]:
    stats = psutil.net_if_stats()
    found: dict[str, list[ipaddress.IPv4Interface]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask:
                iface = ipaddress.IPv4Interface(f"{a.address}/{a.netmask}")
                if not iface.ip.is_loopback:
                    found.setdefault(name, []).append(iface)
    return found


def networks() -> tuple[str, ...]:
    """The IPv4 networks of this node's non-loopback interfaces (the default --allow)."""
    nets = {str(i.network) for ifaces in _interfaces().values() for i in ifaces}
    return tuple(sorted(nets))


def address(host: str = "", interface: str = "") -> str:
    """The address workers should use for this node.

    --host wins, then --interface; else the node's name when it resolves to a non-loopback
    address of this node, else the first address of an up, non-loopback interface.
    Only with no network at all is loopback used.
    """
    if host:
        return host_address(host)
    ifaces = _interfaces()
    if interface:
        if interface not in ifaces:
            raise UsageError(f"--interface {interface}: no such interface with an IPv4 "
                             f"address on this node; it has: {', '.join(ifaces) or 'none'}")
        return str(ifaces[interface][0].ip)
    mine = {str(i.ip) for addrs in ifaces.values() for i in addrs}
    try:
        by_name = socket.gethostbyname(socket.gethostname())
    except OSError:
        by_name = ""
    if by_name in mine:
        return by_name
    # Container and VM bridges are rarely what other nodes reach us by.
    ranked = sorted(ifaces, key=lambda n: n.startswith(_VIRTUAL))
    return str(ifaces[ranked[0]][0].ip) if ranked else "127.0.0.1"


def host_address(host: str) -> str:
    """--host as the IPv4 address it must be: serve listens on it, publishes it and puts
    it in the server's certificate, and a name could resolve elsewhere on another node."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise UsageError(f"--host {host!r} is not an IPv4 address; give the address other "
                         "nodes reach this one by (e.g. --host 10.1.2.3), or --interface "
                         "NAME (e.g. ib0) to use that interface's address") from None


def pick_port(address: str, wanted: int) -> int:
    """`wanted` when nobody listens on it at `address`, else a port the kernel says is free."""
    for port in (wanted, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise ServerFailed(f"no free TCP port on {address}; is that address on this node? "
                       "Use --host or --interface to choose the address to serve on")
