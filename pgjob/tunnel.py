"""`pgjob tunnel`: an ssh port-forward from this machine to the node serving a home.

One ssh process (driven through pexpect, so its host-key and password prompts reach the
user's terminal) is the connection master; the forward itself is changed through its
control socket. So when the server moves to another node or port, the forward is
re-pointed on the same local port without logging in again, and the local URL stays valid.

TLS through the tunnel uses sslmode=verify-ca: the client connects to 127.0.0.1, which no
server certificate names, so verify-full cannot work. The instance's CA is private and
signs nothing but this instance's server certificates, so "signed by this CA" already
means "a server of this instance"; see docs/remote.md.
"""
from __future__ import annotations

import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import psycopg

from . import endpoint
from .endpoint import Endpoint
from .errors import NotPublished, PgJobError, TunnelFailed
from .home import Home
from .proc import run
from .waiting import until

LOCAL_HOST = "127.0.0.1"
TUNNEL_SSLMODE = "verify-ca"
LOGIN_TIMEOUT = 120  # seconds for ssh to log in, prompts answered included
FOLLOW_INTERVAL = 1.0

# Our defaults come after the user's --ssh-option values: ssh keeps the first value given.
SSH_DEFAULTS = ("ExitOnForwardFailure=yes", "ServerAliveInterval=15", "ServerAliveCountMax=3",
                "ConnectTimeout=20", "ControlPersist=no")

# What ssh may print while logging in, in the order pexpect should try them.
HOST_KEY = r"\(yes/no[^)]*\)\? *"
SECRET = (r"(?i)(password|passphrase|passcode|verification code|one-time code|otp|pin)"
          r"[^\r\n]*: *")
FAILURES = (
    ("Permission denied", "authentication failed: check the user name (user@gateway or "
     "--ssh-option User=NAME), the password, or your key (ssh-add)"),
    ("Host key verification failed", "the gateway's host key was not accepted; if it really "
     "changed, remove the old one with `ssh-keygen -R GATEWAY` and try again"),
    ("Could not resolve hostname", "the gateway's name does not resolve: check its spelling, "
     "your VPN, or an alias in ~/.ssh/config"),
    ("Connection refused", "the gateway is unreachable (connection refused): check the name "
     "and port, and that you are on its network or VPN"),
    ("timed out", "the gateway is unreachable (timed out): check the name, your network or "
     "VPN, and any firewall"),
    ("No route to host", "the gateway is unreachable (no route to host): check your network "
     "or VPN"),
    ("Network is unreachable", "the gateway is unreachable (network unreachable): check "
     "your network or VPN"),
    ("Address already in use", "the local port is taken: choose another with --local-port, "
     "or leave it out to get a free one"),
    ("cannot listen to port", "the local port cannot be used: choose another with "
     "--local-port"),
)
REFUSALS = (
    ("administratively prohibited", "the gateway refuses port forwarding (its sshd has "
     "AllowTcpForwarding no): use another gateway, e.g. another login node, or ask the "
     "cluster's administrators"),
    ("connect failed", "the gateway cannot reach the server at {target}: the gateway must "
     "be on the cluster network the server publishes (see `pgjob url --format json`)"),
)


@dataclass(frozen=True)
class Route:
    """Where the forward leads: the published server's address and port."""

    host: str
    port: int

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.port}"


def free_port() -> int:
    """A local TCP port nobody listens on now (the kernel's pick, so two tunnels differ)."""
    with socket.socket() as sock:
        sock.bind((LOCAL_HOST, 0))
        return sock.getsockname()[1]


def destination(via: str) -> list[str]:
    """ssh arguments for the gateway: "a,b,c" jumps through a and b to c (ssh -J)."""
    hops = [h.strip() for h in via.split(",") if h.strip()]
    if not hops:
        raise TunnelFailed("--via needs a gateway, e.g. --via login.cluster.example "
                           "(a login node that can reach the compute nodes)")
    return (["-J", ",".join(hops[:-1])] if len(hops) > 1 else []) + [hops[-1]]


def ask_terminal(prompt: str, secret: bool) -> str:
    """Ask the user, on the terminal, what ssh asks (a password is not echoed)."""
    import click

    if not sys.stdin.isatty():
        raise TunnelFailed(f"ssh asks {prompt.strip()!r} but there is no terminal to answer "
                           "on; run pgjob tunnel in a terminal, or use a key (ssh-agent)")
    return click.prompt(prompt.rstrip(), prompt_suffix=" ", hide_input=secret, default="",
                        show_default=False, err=True)


def _classify(transcript: str, table, **names) -> str | None:
    for needle, advice in table:
        if needle in transcript:
            return advice.format(**names)
    return None


class Tunnel:
    """An ssh master connection to a gateway with one local forward to the server."""

    def __init__(self, home: Home, via: str, *, local_port: int = 0,
                 ssh_options: tuple[str, ...] = (), ask: Callable[[str, bool], str] = ask_terminal,
                 say: Callable[[str], None] = print) -> None:
        self.home = home
        self.via = via
        self.dest = destination(via)
        self.fixed_port = bool(local_port)
        self.local_port = local_port or free_port()
        self.ssh_options = tuple(ssh_options)
        self.ask = ask
        self.say = say
        self.workdir = Path(tempfile.mkdtemp(prefix="pgjob-tunnel-"))  # 0700: our socket
        self.control = self.workdir / "ssh.sock"
        self.child = None
        self.route: Route | None = None
        self.generation = 0
        self.transcript = ""  # what ssh printed lately, for error messages
        self._echo = ""  # our last visible answer, which ssh's terminal echoes back

    # -- the ssh master ---------------------------------------------------------------
    def _forward(self, route: Route) -> str:
        return f"{LOCAL_HOST}:{self.local_port}:{route.spec}"

    def _argv(self, route: Route) -> list[str]:
        options = [a for o in (*self.ssh_options, *SSH_DEFAULTS) for a in ("-o", o)]
        return ["-N", "-M", "-S", str(self.control), *options, "-L", self._forward(route),
                *self.dest]

    def _drain(self) -> str:
        """What ssh printed since we last looked (kept, the last few kB, for errors)."""
        import pexpect

        got = ""
        while self.child is not None:
            try:
                got += self.child.read_nonblocking(4096, timeout=0)
            except (pexpect.TIMEOUT, pexpect.EOF):
                break
        self.transcript = (self.transcript + got)[-8000:]
        return got

    def _login(self, route: Route) -> None:
        """Start the master and answer ssh's prompts until the forward listens."""
        import pexpect

        ssh = shutil.which("ssh")
        if not ssh:
            raise TunnelFailed("no ssh program found on PATH; install OpenSSH's client")
        self._stop_ssh()  # a master that died is reaped before its successor starts
        self.control.unlink(missing_ok=True)
        self.transcript = ""
        self.child = pexpect.spawn(ssh, self._argv(route), encoding="utf-8",
                                   codec_errors="replace", timeout=LOGIN_TIMEOUT)
        patterns = [HOST_KEY, SECRET, pexpect.EOF, pexpect.TIMEOUT]
        self._echo = ""

        def step():
            index = self.child.expect(patterns, timeout=0.3)
            if index == 3:  # nothing new: ready once ssh opened its control socket
                return "up" if self.control.exists() else None
            seen = (self.child.before or "") + (self.child.after if index < 2 else "")
            self.transcript += seen
            if index == 2:
                self.child.wait()
                return "exited"
            self._relay(seen, secret=index == 1)
            return None

        outcome = until(step, LOGIN_TIMEOUT, interval=0)
        if outcome != "up":
            self._fail_login(outcome is None)
        self.route = route

    def _relay(self, seen: str, secret: bool) -> None:
        """Show the user what ssh said and asked; send back the answer."""
        lines = [line for line in seen.splitlines() if line.strip()] or [seen]
        if lines[0].strip() == self._echo:  # ssh's terminal echoing our last answer
            lines = lines[1:] or [seen]
        if len(lines) > 1:  # the host key's fingerprint, "please try again", ...
            self.say("\n".join(lines[:-1]))
        answer = self.ask(lines[-1], secret)
        self._echo = "" if secret else answer.strip()
        self.child.sendline(answer)

    def _fail_login(self, timed_out: bool) -> None:
        self._drain()
        self._stop_ssh()
        detail = self.transcript.strip()
        if timed_out:
            raise TunnelFailed(f"ssh to {self.via} did not log in within {LOGIN_TIMEOUT} s",
                               detail=detail)
        advice = _classify(self.transcript, FAILURES) or "ssh exited; see its output below"
        raise TunnelFailed(f"ssh to {self.via}: {advice}", detail=detail)

    def _control(self, op: str, route: Route) -> None:
        run([shutil.which("ssh") or "ssh", "-S", self.control, "-O", op,
             "-L", self._forward(route), *self.dest],
            timeout=20, what=f"ssh -O {op} on the tunnel to {self.via}")

    def alive(self) -> bool:
        return self.child is not None and self.child.isalive()

    # -- the server behind it ----------------------------------------------------------
    def local_endpoint(self, found: Endpoint) -> Endpoint:
        """The endpoint as seen through this tunnel."""
        return replace(found, host=LOCAL_HOST, port=self.local_port)

    def probe(self, found: Endpoint) -> str | None:
        """None when an authenticated query works through the tunnel, else why not."""
        try:
            with self.local_endpoint(found).connect(timeout=10, sslmode=TUNNEL_SSLMODE) as c:
                c.execute("select 1")
            return None
        except psycopg.Error as exc:
            until(lambda: "open failed" in self._drain() or None, 0.5)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            refusal = _classify(self.transcript, REFUSALS, target=f"{found.host}:{found.port}")
            if refusal:
                return refusal
            if "pg_hba.conf" in first:
                return (f"{first}: the server does not let the gateway's address in; add the "
                        "gateway's network with `pgjob init --allow CIDR` and restart serve")
            return first

    def open(self, wait: float = 0) -> Endpoint:
        """Log in, forward to the published server, check a query gets through; the local
        endpoint (a retry on another free port if ours was taken meanwhile)."""
        try:
            return self._open(wait)
        except BaseException:
            self.close()
            raise

    def _open(self, wait: float) -> Endpoint:
        found = until(lambda: endpoint.read(self.home), wait, interval=0.5, max_interval=5)
        if found is None:
            raise NotPublished(f"nothing is served for {self.home.path}: start the server "
                               "(`pgjob submit` or `pgjob serve`), check it with `pgjob "
                               "status`, or wait for it with --wait SECONDS")
        for attempt in range(3):
            try:
                self._login(Route(found.host, found.port))
                break
            except TunnelFailed as exc:
                taken = "Address already in use" in str(exc) or "cannot listen" in str(exc)
                if self.fixed_port or not taken or attempt == 2:
                    raise
                self.local_port = free_port()
        self.generation = found.generation
        problem = self.probe(found)
        if problem:
            raise TunnelFailed(f"the tunnel through {self.via} is up but the server at "
                               f"{found.host}:{found.port} did not answer through it: {problem}",
                               detail=self.transcript.strip())
        return self.local_endpoint(found)

    def follow_once(self) -> None:
        """Re-point the forward if the server moved; log in again if ssh died."""
        self._drain()
        found = endpoint.read(self.home)
        if not self.alive():
            self.say(f"pgjob tunnel: the ssh connection to {self.via} ended; connecting again")
            self._login(Route(found.host, found.port) if found else self.route)
            if found:
                self.generation = found.generation
            return
        if found is None or found.generation == self.generation:
            return
        self.generation = found.generation
        route = Route(found.host, found.port)
        if route != self.route:
            self._control("cancel", self.route)
            self._control("forward", route)
            self.route = route
        problem = self.probe(found)
        self.say(f"pgjob tunnel: the server is now at {route.spec} (generation "
                 f"{found.generation}); same local port {self.local_port}"
                 + (f"; it does not answer yet: {problem}" if problem else ""))

    def follow(self, stop: threading.Event) -> None:
        """Keep following the server until `stop` is set."""
        while not stop.wait(FOLLOW_INTERVAL):
            try:
                self.follow_once()
            except PgJobError as exc:  # say it and keep trying: the next look may work
                self.say(f"pgjob tunnel: {exc.args[0]}")  # not ssh's transcript: its
                # prompts, shown again, would read as questions

    def _stop_ssh(self) -> None:
        if self.child is not None:
            self.child.close(force=True)
            self.child = None

    def close(self) -> None:
        """End ssh (and with it the forward) and remove the control socket's folder."""
        self._stop_ssh()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run_until_stopped(tunnel: Tunnel) -> None:
    """Follow the server in the foreground until Ctrl-C or SIGTERM; close the tunnel.

    SIGTERM acts as Ctrl-C does, so it also ends a prompt that waits for an answer.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        tunnel.follow(threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        tunnel.close()
