"""The PostgreSQL configuration pgjob writes: rendered once, correctly, and user edits kept."""
from pgjob import conf


def test_values_are_quoted_once_and_correctly():
    text = conf.render_conf({"port": 5433, "listen_addresses": "10.0.0.1",
                             "log_line_prefix": "it's %m \\ ", "logging_collector": False})
    assert text.startswith("# managed by pgjob")
    assert "port = 5433\n" in text
    assert "listen_addresses = '10.0.0.1'\n" in text
    assert "log_line_prefix = 'it''s %m \\\\ '\n" in text
    assert "logging_collector = off\n" in text


def test_max_connections_leave_room_for_pgjob_and_superuser():
    assert conf.max_connections(100) >= 2 * 100 + conf.SUPERUSER_SLOTS + 1
    assert conf.static_params(10)["max_connections"] == conf.max_connections(10)


def test_shared_buffers_follow_the_job_memory_within_bounds():
    gib = 1024 ** 3
    assert conf.memory_params(16 * gib)["shared_buffers"] == "4096MB"
    assert conf.memory_params(256 * 1024 ** 2)["shared_buffers"] == "128MB"
    assert conf.memory_params(1024 * gib)["shared_buffers"] == "8192MB"


def _block(*networks):
    return conf.hba_block(conf.Access("optuna", "optuna", "postgres", networks))


def test_hba_allows_only_the_app_role_from_allowed_networks_and_rejects_the_rest():
    lines = [l.split() for l in _block("10.1.0.0/16").splitlines() if not l.startswith("#")]
    host_lines = [l for l in lines if l[0].startswith("host")]
    # the app role only over TLS; anything else over TCP is rejected
    assert ["hostssl", '"optuna"', '"optuna"', "10.1.0.0/16", "scram-sha-256"] in host_lines
    assert all(l[-1] == "reject" and l[0] == "host" for l in host_lines
               if l[3] != "10.1.0.0/16")
    assert not any("trust" in l for l in lines)
    # the superuser appears only on the Unix socket
    assert [l[0] for l in lines if l[2] == '"postgres"'] == ["local"]


def test_hba_block_is_replaced_in_place_and_user_lines_survive():
    users = "# my notes\nhost optuna optuna 192.168.7.0/24 scram-sha-256\n"
    first = conf.merge_hba(users, _block("10.1.0.0/16"))
    second = conf.merge_hba(first, _block("10.2.0.0/16"))
    assert "192.168.7.0/24" in second and "# my notes" in second
    assert "10.2.0.0/16" in second and "10.1.0.0/16" not in second
    assert second.count(conf.HBA_BEGIN) == 1


def test_fresh_hba_holds_only_our_block():
    text = conf.merge_hba(None, _block("10.1.0.0/16"))
    assert "trust" not in text and "peer" not in text


def test_include_line_added_once(tmp_path):
    pgconf = tmp_path / "postgresql.conf"
    pgconf.write_text("shared_buffers = 128MB\n")
    pgconf.write_text(conf.ensure_include(pgconf))
    assert conf.ensure_include(pgconf) is None
    assert pgconf.read_text().count("pgjob.conf") == 1
    assert pgconf.read_text().startswith("shared_buffers = 128MB")

