"""Settings that would rewrite pg_hba.conf (or crash pgjob) are refused at the door, by
`pgjob init` and `pgjob serve` alike: exit code 4, one line naming the setting and where it
came from, no traceback, and the home's configuration left as it was."""
import re
from pathlib import Path

import pytest

from conftest import Served, run_pgjob

pytestmark = pytest.mark.pg

TRUST_ANYONE = "127.0.0.1/32 trust #"  # rendered as-is, this line needed no password


def guarded_files(home: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (home / "data" / "pg_hba.conf", home / "pgjob.toml",
                                        home / "data" / "pgjob.conf")}


def assert_refused(returncode: int, output: str, *words: str) -> None:
    lines = output.strip().splitlines()
    assert returncode == 4, output
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("pgjob: error: "), output
    for word in words:
        assert word in lines[0], output


def init_refused(home: Path, *options: str, env: dict | None = None, words=()) -> None:
    before = guarded_files(home)
    done = run_pgjob("init", "--home", str(home), *options, env=env)
    assert_refused(done.returncode, done.stderr, *words)
    assert guarded_files(home) == before


def serve_refused(home: Path, log: Path, *options: str, env: dict | None = None,
                  words=()) -> None:
    """serve in the background (a serve that wrongly starts is stopped after the test)."""
    before = guarded_files(home)
    served = Served(home, log, *options, env=env)
    returncode = served.process.wait(60)
    assert_refused(returncode, log.read_text(), *words)
    assert guarded_files(home) == before
    assert not (home / "run" / "lease.json").exists()  # refused before taking the home


def set_in_toml(home: Path, key: str, toml_value: str) -> None:
    path = home / "pgjob.toml"
    text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {toml_value}", path.read_text())
    path.write_text(text if found else text + f"{key} = {toml_value}\n")


def test_an_allow_variable_with_a_method_in_it_is_refused(home_path, tmp_path):
    env = {"PGJOB_ALLOW": TRUST_ANYONE}
    words = ("setting allow", "PGJOB_ALLOW", "10.1.0.0/16")
    init_refused(home_path, env=env, words=words)
    serve_refused(home_path, tmp_path / "serve.log", env=env, words=words)


def test_an_allow_option_smuggling_words_in_an_ipv6_zone_is_refused(home_path):
    # Python's ipaddress accepts "fe80::1%eth0 trust #" as an address with a zone
    init_refused(home_path, "--allow", "fe80::1%eth0 trust #",
                 words=("setting allow", "--allow"))


@pytest.mark.parametrize("key,toml_value", [
    ("user", '"a,postgres"'),  # a role list: the superuser over TCP
    ("user", '"postgres"'),  # the app role's hostssl line would be the superuser's
    ("allow", "[1]"),
    ("allow", f'["{TRUST_ANYONE}"]'),
    ("backups_keep", "0"),  # would delete every backup, the new one too
    ("port", "true"),
    ("grace_period", "10"),  # shorter than the 30 s heartbeat: every trial failed
])
def test_a_bad_value_in_pgjob_toml_is_refused(home_path, tmp_path, key, toml_value):
    set_in_toml(home_path, key, toml_value)
    words = (f"setting {key}", "pgjob.toml")
    init_refused(home_path, words=words)
    serve_refused(home_path, tmp_path / "serve.log", words=words)


def test_serve_host_must_be_an_address_not_a_name(home_path):
    before = guarded_files(home_path)
    done = run_pgjob("serve", "--home", str(home_path), "--host", "localhost")
    assert_refused(done.returncode, done.stderr, "--host 'localhost'", "IPv4 address")
    assert guarded_files(home_path) == before
    assert not (home_path / "run" / "lease.json").exists()
