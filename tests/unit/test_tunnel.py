"""The tunnel's pure parts: the ssh command for a gateway list, and ssh's failures read as
advice (its end-to-end tests are in tests/test_tunnel.py)."""
import pytest

from pgjob import tunnel
from pgjob.errors import TunnelFailed


def test_a_gateway_list_becomes_ssh_jumps():
    assert tunnel.destination("me@login1") == ["me@login1"]
    assert tunnel.destination("bastion, login1,node7") == ["-J", "bastion,login1", "node7"]
    with pytest.raises(TunnelFailed):
        tunnel.destination(" , ")


def test_ssh_failures_become_advice():
    said = tunnel._classify("ssh: connect to host x port 22: Connection refused\r\n",
                            tunnel.FAILURES)
    assert "unreachable (connection refused)" in said
    said = tunnel._classify("channel 3: open failed: administratively prohibited: open failed",
                            tunnel.REFUSALS, target="10.0.0.5:5432")
    assert "AllowTcpForwarding" in said
    said = tunnel._classify("channel 3: open failed: connect failed: No route to host",
                            tunnel.REFUSALS, target="10.0.0.5:5432")
    assert "cannot reach the server at 10.0.0.5:5432" in said
