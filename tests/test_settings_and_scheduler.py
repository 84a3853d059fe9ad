"""pgjob's own settings and this node's address: pure logic, no server. (What the scheduler
tells a job is in tests/unit/test_schedulers.py.)"""
import pytest

from pgjob import netinfo
from pgjob.errors import UsageError
from pgjob.home import Home, resolve_path
from pgjob.settings import Settings


def test_settings_round_trip_through_toml(tmp_path):
    home = Home(tmp_path)
    settings = Settings(port=6000, workers=12, allow=("10.0.0.0/8",), pg_bin="/opt/pg/bin")
    home.save_settings(settings)
    assert home.settings() == settings
    assert (tmp_path / "pgjob.toml").stat().st_mode & 0o777 == 0o600


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    home = Home(tmp_path)
    home.save_settings(Settings(port=6000))
    monkeypatch.setenv("PGJOB_PORT", "6001")
    monkeypatch.setenv("PGJOB_ALLOW", "10.1.0.0/16, 10.2.0.0/16")
    assert home.settings().port == 6001
    assert home.settings().allow == ("10.1.0.0/16", "10.2.0.0/16")


def test_a_bad_number_names_the_setting(tmp_path, monkeypatch):
    home = Home(tmp_path)
    home.save_settings(Settings())
    monkeypatch.setenv("PGJOB_WORKERS", "many")
    with pytest.raises(UsageError, match="workers"):
        home.settings()


def test_home_comes_from_option_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PGJOB_HOME", str(tmp_path / "env"))
    assert resolve_path(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_path(None) == tmp_path / "env"
    monkeypatch.delenv("PGJOB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path(None) == tmp_path / ".pgjob" / "default"


def test_published_address_is_never_loopback_when_a_network_exists():
    assert netinfo.address(host="10.9.9.9") == "10.9.9.9"
    nets = netinfo.networks()
    if nets:
        assert not netinfo.address().startswith("127.")
    assert all(not n.startswith("127.") for n in nets)


def test_unknown_interface_lists_the_real_ones():
    with pytest.raises(UsageError, match="no such interface"):
        netinfo.address(interface="nosuch0")
