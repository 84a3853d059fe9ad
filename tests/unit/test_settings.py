"""Every pgjob setting is checked once, where it enters, into a typed value or a one-line
refusal naming the setting, where it came from and what it must be; renderers only quote."""
import logging
import os

import pytest

from pgjob import conf, netinfo, pooler, settings as settings_rules
from pgjob.errors import UsageError
from pgjob.home import Home, resolve_path
from pgjob.settings import Settings


def merged_settings(target: Home, **options) -> Settings:
    return settings_rules.load(target.settings_file, **options)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def refused(values, sources=None) -> str:
    with pytest.raises(UsageError) as caught:
        Settings.from_mapping(values, sources)
    return str(caught.value)


def test_good_values_are_typed_and_normalized():
    settings = Settings.from_mapping(
        {"allow": ["10.1.2.9/24", " 10.1.2.3 ", "10.1.2.0/24", "fd00::/8"], "port": 6000,
         "workers": 1, "database": "Study_1", "user": "_app", "backups_keep": 1,
         "backup_interval": 0, "stop_margin": 0, "pooler": "pgbouncer", "run_as": "pg-job.1",
         "pg_bin": "/opt/pg 15/bin", "storage": "journal"})
    assert settings.allow == ("10.1.2.0/24", "10.1.2.3/32", "fd00::/8")
    assert (settings.port, settings.workers, settings.database, settings.user) == (
        6000, 1, "Study_1", "_app")
    assert settings.storage == "journal"


def test_environment_text_becomes_numbers_and_networks():
    settings = Settings.from_mapping(
        {"port": " 6001 ", "allow": "10.0.0.0/8, ::1,", "backups_keep": "2"},
        {"port": "PGJOB_PORT", "allow": "PGJOB_ALLOW", "backups_keep": "PGJOB_BACKUPS_KEEP"})
    assert (settings.port, settings.allow, settings.backups_keep) == (
        6001, ("10.0.0.0/8", "::1/128"), 2)


@pytest.mark.parametrize("empty", ["", [], ()])
def test_empty_allow_means_the_nodes_own_networks(empty):
    assert Settings.from_mapping({"allow": empty}).allow == ()


def test_the_defaults_and_what_init_writes_read_back_unchanged():
    assert Settings.from_mapping({}) == Settings()
    assert Settings.from_mapping(tomllib.loads(Settings().to_toml())) == Settings()


BAD = [
    # pg_hba injection: a network followed by a method and a comment
    ("allow", "127.0.0.1/32 trust #", "PGJOB_ALLOW"),
    ("allow", ["10.0.0.0/8\nhost all all 0.0.0.0/0 trust"], "pgjob.toml"),
    # Python's ipaddress keeps an IPv6 %zone as free text, spaces included
    ("allow", ["fe80::1%eth0 trust #"], "--allow"),
    ("allow", ["fe80::1%eth0"], "--allow"),
    ("allow", [1], "pgjob.toml"),  # ip_network(1) would be 0.0.0.1/32
    ("allow", 167772160, "pgjob.toml"),
    ("allow", {"net": "10.0.0.0/8"}, "pgjob.toml"),
    ("allow", "cluster-net", "--allow"),
    # a role list: "a,postgres" in pg_hba lets the superuser in over TCP
    ("user", "a,postgres", "pgjob.toml"),
    ("user", 'x" all', "pgjob.toml"),
    ("user", "", "--user"),
    ("user", "1abc", "--user"),
    ("user", "a" * 64, "--user"),
    ("user", "pg_monitor", "--user"),
    ("user", "public", "--user"),
    ("user", "café", "--user"),
    ("user", 5, "pgjob.toml"),
    ("database", "optuna db", "--database"),
    ("database", "all,postgres", "PGJOB_DATABASE"),
    ("database", "postgres", "--database"),
    ("database", "pgbouncer", "--database"),
    ("superuser", "root user", "pgjob.toml"),
    ("port", 0, "--port"),
    ("port", 65536, "--port"),
    ("port", True, "pgjob.toml"),
    ("port", "5432", "pgjob.toml"),  # TOML has numbers: a string is a mistake there
    ("port", 5432.0, "pgjob.toml"),
    ("port", "abc", "PGJOB_PORT"),
    ("port", "0x10", "PGJOB_PORT"),
    ("port", "5_432", "PGJOB_PORT"),
    ("port", "５４３２", "PGJOB_PORT"),  # int() takes these full-width digits
    ("workers", 0, "--workers"),
    ("workers", 10**6, "--workers"),
    ("workers", False, "pgjob.toml"),
    ("workers", "many", "PGJOB_WORKERS"),
    ("heartbeat_interval", 0, "pgjob.toml"),
    ("backup_interval", -1, "pgjob.toml"),
    ("backups_keep", 0, "pgjob.toml"),  # rotation would delete every backup
    ("backups_keep", "0", "PGJOB_BACKUPS_KEEP"),
    ("stop_margin", -1, "PGJOB_STOP_MARGIN"),
    ("stop_margin", 2**63, "pgjob.toml"),  # no TOML integer holds it
    ("lease_ttl", 5, "pgjob.toml"),  # under the clocks' skew: a live serve is taken over
    ("lease_ttl", "7200", "PGJOB_LEASE_TTL"),
    ("pooler", "pgpool", "PGJOB_POOLER"),
    ("pooler", ["pgbouncer"], "pgjob.toml"),
    ("storage", "Journal", "PGJOB_STORAGE"),  # every worker must read the same kind
    ("storage", "redis", "--storage"),
    ("run_as", "a b", "--run-as"),
    ("run_as", "-root", "--run-as"),
    ("run_as", 0, "pgjob.toml"),
    ("pg_bin", 5, "pgjob.toml"),
    ("pg_bin", "/opt/pg\n/bin", "PGJOB_PG_BIN"),
]


@pytest.mark.parametrize("name,value,where", BAD)
def test_a_bad_value_is_refused_naming_the_setting_its_source_and_the_form(name, value, where):
    message = refused({name: value}, {name: where})
    assert message.startswith(f"setting {name} = ")
    assert f"from {where}" in message and "must be" in message
    assert "\n" not in message  # the CLI prints it as one line


def test_the_accepted_form_is_spelled_out():
    assert "10.1.0.0/16" in refused({"allow": ["x"]})
    assert "from 1 to 65535" in refused({"port": 0})
    assert "from 1 to" in refused({"backups_keep": 0})
    assert "letters" in refused({"user": "a,postgres"})
    assert '"pgbouncer"' in refused({"pooler": "pgpool"})
    assert '"rdb", "journal"' in refused({"storage": "file"})


def test_the_app_role_cannot_be_the_superuser():
    message = refused({"user": "postgres"}, {"user": "--user"})
    assert message.startswith("setting user = 'postgres' from --user")
    assert "superuser" in message and "the default" in message
    message = refused({"superuser": "optuna"}, {"superuser": "/h/pgjob.toml"})
    assert message.startswith("setting superuser = 'optuna' from /h/pgjob.toml")


def test_the_grace_period_must_outlast_a_heartbeat():
    message = refused({"grace_period": 30}, {"grace_period": "/h/pgjob.toml"})
    assert message.startswith("setting grace_period = 30 from /h/pgjob.toml")
    assert "more than heartbeat_interval (30, from the default)" in message
    # the setting named is the one that was set, not the default it clashes with
    message = refused({"heartbeat_interval": "200"},
                      {"heartbeat_interval": "PGJOB_HEARTBEAT_INTERVAL"})
    assert message.startswith("setting heartbeat_interval = 200 from PGJOB_HEARTBEAT_INTERVAL")
    assert "less than grace_period (120, from the default)" in message
    assert Settings.from_mapping({"heartbeat_interval": 1, "grace_period": 2}).grace_period == 2


def test_unknown_keys_are_ignored_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pgjob.home"):
        for _ in range(2):
            assert Settings.from_mapping({"backup_keep": 0}, {"backup_keep": "/x/pgjob.toml"}) \
                == Settings()
    warned = [r.getMessage() for r in caplog.records if "backup_keep" in r.getMessage()]
    assert len(warned) == 1 and "/x/pgjob.toml" in warned[0]


def test_a_setting_without_a_rule_is_still_type_checked():
    check = settings_rules._by_default_type(90)
    assert check("45", True) == 45
    with pytest.raises(settings_rules.Refused):
        check(True, False)
    with pytest.raises(settings_rules.Refused):
        settings_rules._by_default_type("")(["x"], False)


# Where settings come from: the home's file, the environment, the command line.

def test_the_home_says_which_file_or_variable_holds_a_bad_value(tmp_path, monkeypatch):
    target = Home(tmp_path)
    target.settings_file.write_text('allow = [1]\nuser = "optuna"\n')
    message = str(pytest.raises(UsageError, target.settings).value)
    assert f"from {tmp_path / 'pgjob.toml'}" in message
    target.settings_file.write_text('user = "optuna"\n')
    monkeypatch.setenv("PGJOB_ALLOW", "127.0.0.1/32 trust #")
    assert "from PGJOB_ALLOW" in str(pytest.raises(UsageError, target.settings).value)


def test_init_options_go_through_the_same_checks(tmp_path, monkeypatch):
    target = Home(tmp_path / "new")
    message = str(pytest.raises(UsageError, merged_settings, target,
                                allow=("10.0.0.0/8", "fe80::1%x trust #")).value)
    assert message.startswith("setting allow = ") and "from --allow" in message
    assert "from --user" in str(pytest.raises(UsageError, merged_settings, target,
                                              user="a,postgres").value)
    assert merged_settings(target, allow=("10.1.2.9/24",), workers=3).allow == ("10.1.2.0/24",)
    # a new home takes PGJOB_<NAME> too, so a bad variable is never silently unused
    monkeypatch.setenv("PGJOB_BACKUPS_KEEP", "0")
    assert "from PGJOB_BACKUPS_KEEP" in str(pytest.raises(UsageError, merged_settings,
                                                          target).value)


def test_the_command_line_beats_the_environment_which_beats_pgjob_toml(tmp_path, monkeypatch):
    target = Home(tmp_path)
    target.settings_file.write_text("port = 6000\nworkers = 3\nbackups_keep = 2\n")
    monkeypatch.setenv("PGJOB_PORT", "6001")
    monkeypatch.setenv("PGJOB_WORKERS", "4")
    found = merged_settings(target, port=6002, workers=None, allow=())
    assert (found.port, found.workers, found.backups_keep, found.allow) == (6002, 4, 2, ())


@pytest.mark.parametrize("content", [b"port = \n", b"port = 6000\nport = 6001\n",
                                     b"user = '\xff'\n"])
def test_a_pgjob_toml_that_cannot_be_read_says_to_fix_or_delete_it(tmp_path, content):
    target = Home(tmp_path)
    target.settings_file.write_bytes(content)
    message = str(pytest.raises(UsageError, target.settings).value)
    assert message.startswith(f"{target.settings_file} is not valid TOML (")
    assert message.endswith("fix or delete it, then run `pgjob init` again")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_pgjob_toml_the_caller_cannot_read_names_the_account_to_use(tmp_path):
    target = Home(tmp_path)
    target.settings_file.write_text('user = "optuna"\n')
    target.settings_file.chmod(0)
    message = str(pytest.raises(UsageError, target.settings).value)
    assert message.startswith(f"cannot read {target.settings_file}: Permission denied")
    assert "account that owns the home" in message


def test_no_pgjob_toml_means_the_defaults(tmp_path, monkeypatch):
    for name in vars(Settings()):
        monkeypatch.delenv("PGJOB_" + name.upper(), raising=False)
    assert Home(tmp_path).settings() == Settings()


# The renderers quote what the checks let through.

def test_pg_hba_names_are_double_quoted_and_keywords_stay_bare():
    block = conf.hba_block(conf.Access("optuna", "app", "postgres", ("10.1.0.0/16",)))
    assert 'hostssl "optuna"     "app"        10.1.0.0/16' in block
    assert 'local   all          "postgres"' in block
    assert "host    all          all          0.0.0.0/0            reject" in block
    assert conf.hba_name("all") == '"all"'  # quoted: a database named all, not every one
    assert conf.hba_name('a"b') == '"a""b"'


def test_pgbouncer_hba_quotes_names_the_same_way():
    hba = pooler.render_hba("optuna", "app", ("10.1.0.0/16", "::1/128"))
    assert hba.splitlines()[:2] == ['hostssl "optuna" "app" 10.1.0.0/16 scram-sha-256',
                                    'hostssl "optuna" "app" ::1/128 scram-sha-256']


# the settings file, the environment on top, and where the home is

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



# serve --host

def test_serve_host_must_be_an_ipv4_address():
    assert netinfo.address(host="10.1.2.3") == "10.1.2.3"
    for name in ("localhost", "node7", "10.1.2", "::1", "10.1.2.3 ", "010.1.2.3"):
        with pytest.raises(UsageError, match=r"^--host .* is not an IPv4 address"):
            netinfo.address(host=name)


def test_published_address_is_never_loopback_when_a_network_exists():
    assert netinfo.address(host="10.9.9.9") == "10.9.9.9"
    nets = netinfo.networks()
    if nets:
        assert not netinfo.address().startswith("127.")
    assert all(not n.startswith("127.") for n in nets)


def test_unknown_interface_lists_the_real_ones():
    with pytest.raises(UsageError, match="no such interface"):
        netinfo.address(interface="nosuch0")
