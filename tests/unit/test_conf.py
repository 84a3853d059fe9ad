"""The PostgreSQL configuration pgjob writes: rendered once, correctly, and user edits kept."""
import stat

from pgjob import conf
from pgjob.home import Home
from pgjob.instance import write_conf
from pgjob.settings import Settings


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



def test_the_include_line_goes_after_the_users_settings_so_ours_win(tmp_path):
    pgconf = tmp_path / "postgresql.conf"
    pgconf.write_text("work_mem = 64MB\nport = 1111")  # no newline at the end
    text = conf.ensure_include(pgconf)
    lines = text.splitlines()
    # postgresql.conf: a later line wins, so ours is last and the user's are untouched
    assert lines[:2] == ["work_mem = 64MB", "port = 1111"]
    assert lines[-1] == conf.INCLUDE_LINE and text.endswith("\n")


def test_a_commented_out_include_line_does_not_count_as_there(tmp_path):
    pgconf = tmp_path / "postgresql.conf"
    pgconf.write_text("#" + conf.INCLUDE_LINE + "\n")
    assert conf.ensure_include(pgconf).splitlines()[-1] == conf.INCLUDE_LINE


def test_a_user_line_above_the_block_stays_above_it_and_one_below_stays_below():
    first = conf.merge_hba(None, _block("10.1.0.0/16"))
    edited = ("host optuna optuna 192.168.7.0/24 scram-sha-256\n" + first
              + "host all all 172.16.0.0/12 scram-sha-256\n")
    lines = conf.merge_hba(edited, _block("10.2.0.0/16")).splitlines()
    begin, end = lines.index(conf.HBA_BEGIN), lines.index(conf.HBA_END)
    assert [i for i, l in enumerate(lines) if "192.168.7.0/24" in l] == [0]
    assert [i for i, l in enumerate(lines) if "172.16.0.0/12" in l] == [end + 1]
    assert any("10.2.0.0/16" in l for l in lines[begin:end])


def test_a_hba_file_without_our_block_gets_it_first_and_keeps_the_users_lines():
    users = "local all all peer\nhost all all 127.0.0.1/32 trust\n"
    text = conf.merge_hba(users, _block("10.1.0.0/16"))
    assert text.startswith(conf.HBA_BEGIN + "\n")  # first match: ours rejects the rest
    assert text.endswith(users)


def test_a_block_whose_end_mark_was_deleted_is_put_first_again_once():
    broken = "# my notes\n" + _block("10.1.0.0/16").replace(conf.HBA_END + "\n", "")
    once = conf.merge_hba(broken, _block("10.2.0.0/16"))
    assert once.startswith(conf.HBA_BEGIN) and "# my notes" in once
    assert conf.merge_hba(once, _block("10.2.0.0/16")) == once


def test_node_settings_override_the_static_ones_and_are_rendered_once():
    params = {**conf.static_params(8),
              **conf.node_params(port=6001, listen="10.1.2.3", socket_dir="/tmp/pgjob s",
                                 memory_bytes=8 * 1024 ** 3)}
    lines = conf.render_conf(params).splitlines()
    assert [l for l in lines if l.startswith("listen_addresses")] == \
        ["listen_addresses = '10.1.2.3'"]
    assert "port = 6001" in lines and "unix_socket_directories = '/tmp/pgjob s'" in lines
    assert "shared_buffers = '2048MB'" in lines
    assert "effective_cache_size = '4096MB'" in lines


def test_effective_cache_size_is_never_below_shared_buffers():
    small = conf.memory_params(64 * 1024 ** 2)  # a job given less than the 128 MB floor
    assert small == {"shared_buffers": "128MB", "effective_cache_size": "128MB"}


def test_the_files_init_and_serve_write_are_private_and_keep_the_users_edits(tmp_path):
    home = Home(tmp_path / "home")
    home.path.mkdir(mode=0o700)
    home.data.mkdir(mode=0o700)
    (home.data / "postgresql.conf").write_text("work_mem = 64MB\n")
    (home.data / "pg_hba.conf").write_text("host optuna optuna 192.168.7.0/24 scram-sha-256\n")
    for networks in (("10.1.0.0/16",), ("10.2.0.0/16",)):  # init, then a serve elsewhere
        write_conf(home, Settings(allow=networks), conf.static_params(8))
    for name in ("pgjob.conf", "postgresql.conf", "pg_hba.conf"):
        assert stat.S_IMODE((home.data / name).stat().st_mode) == 0o600, name
    pgjob_conf = (home.data / "pgjob.conf").read_text()
    assert pgjob_conf.startswith(conf.HEADER) and "max_connections = 24\n" in pgjob_conf
    postgresql_conf = (home.data / "postgresql.conf").read_text()
    assert postgresql_conf.startswith("work_mem = 64MB\n")
    assert postgresql_conf.count("pgjob.conf") == 1
    hba = (home.data / "pg_hba.conf").read_text()
    assert hba.count(conf.HBA_BEGIN) == 1 and "192.168.7.0/24" in hba
    assert "10.2.0.0/16" in hba and "10.1.0.0/16" not in hba
