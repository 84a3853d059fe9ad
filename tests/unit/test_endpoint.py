"""The endpoint file without a server: what is published, what a reader makes of it (a
bad, half-written or withdrawn file is "nothing served"), and how it is rendered."""
import dataclasses
import json
import os
import stat
import subprocess

import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from pgjob import endpoint
from pgjob.errors import NotPublished, UsageError


def published(home, **changes) -> endpoint.Endpoint:
    """An endpoint as serve publishes it, for this home's secrets."""
    return dataclasses.replace(endpoint.Endpoint(
        host="10.1.2.3", port=5433, database="optuna", user="optuna",
        passfile=str(home.app_passfile), node="node7", job_id="4242", scheduler="slurm",
        pid=12345, started_at=1700000000.5, generation=3, system_identifier="7301234567890",
        sslrootcert=str(home.secrets / "ca.crt")), **changes)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_published_endpoint_is_private_and_read_back_as_published(home):
    served = published(home)
    endpoint.publish(home, served)
    assert mode(home.endpoint_file) == 0o600
    assert json.loads(home.endpoint_file.read_text())["state"] == "serving"
    assert endpoint.read(home) == served
    assert endpoint.last_generation(home) == 3
    # replaced atomically: no temporary file is left beside it
    assert sorted(p.name for p in home.path.iterdir()) == ["endpoint.json", "run", "secrets"]


def test_a_reader_uses_its_own_view_of_the_home_s_secrets(home, tmp_path):
    """A home moved, or mounted elsewhere on this node, still reads right."""
    endpoint.publish(home, published(home, passfile="/old/place/secrets/app.pgpass",
                                     sslrootcert="/old/place/secrets/ca.crt"))
    found = endpoint.read(home)
    assert found.passfile == str(home.path / "secrets" / "app.pgpass")
    assert found.sslrootcert == str(home.path / "secrets" / "ca.crt")


def test_withdrawn_is_nothing_served_and_keeps_the_generation(home):
    endpoint.publish(home, published(home, generation=7))
    endpoint.withdraw(home, "stopped by SIGTERM")
    assert endpoint.read(home) is None
    assert endpoint.last_generation(home) == 7
    assert mode(home.endpoint_file) == 0o600
    left = json.loads(home.endpoint_file.read_text())
    assert left["state"] == "withdrawn" and left["reason"] == "stopped by SIGTERM"
    assert (left["node"], left["job_id"]) == ("node7", "4242")
    assert "host" not in left and "port" not in left  # no stale address is handed out


def test_withdrawing_with_nothing_published_starts_at_generation_zero(home):
    endpoint.withdraw(home, "never started")
    assert endpoint.read(home) is None
    assert endpoint.last_generation(home) == 0


def test_a_new_generation_replaces_the_old_one(home):
    endpoint.publish(home, published(home, generation=1, port=5433))
    endpoint.withdraw(home, "restart")
    endpoint.publish(home, published(home, generation=endpoint.last_generation(home) + 1,
                                     port=6000))
    found = endpoint.read(home)
    assert (found.generation, found.port) == (2, 6000)


FULL = json.loads(endpoint.Endpoint(
    host="10.1.2.3", port=5433, database="optuna", user="optuna", passfile="p", node="n",
    job_id="1", scheduler="none", pid=1, started_at=0.0, generation=1,
    system_identifier="1").to_json())

NOTHING_SERVED = {
    "missing": None,
    "empty": b"",
    "half-written": json.dumps(FULL).encode()[:40],
    "not an object": b'["10.1.2.3", 5433]',
    "null": b"null",
    "not UTF-8": b'{"host": "\xff\xfe"}',
    "without its state": json.dumps({k: v for k, v in FULL.items() if k != "state"}).encode(),
    "in another state": json.dumps({**FULL, "state": "starting"}).encode(),
    "nested too deeply": b'{"host": ' + b"[" * 100_000,
    "without a port": json.dumps({k: v for k, v in FULL.items() if k != "port"}).encode(),
}


@pytest.mark.parametrize("content", NOTHING_SERVED.values(), ids=NOTHING_SERVED.keys())
def test_a_file_that_is_not_a_whole_serving_endpoint_is_nothing_served(home, content):
    if content is not None:
        home.endpoint_file.write_bytes(content)
    assert endpoint.read(home) is None
    with pytest.raises(NotPublished, match="^nothing is served for "):
        endpoint.wait_connectable(home)


def test_a_folder_in_place_of_the_file_is_nothing_served(home):
    home.endpoint_file.mkdir(mode=0o700)
    assert endpoint.read(home) is None
    assert endpoint.last_generation(home) == 0


def test_a_generation_that_is_not_a_number_counts_as_zero(home):
    home.endpoint_file.write_text(json.dumps({**FULL, "generation": "9"}))
    assert endpoint.last_generation(home) == 0


def test_fields_a_newer_pgjob_adds_are_ignored(home):
    home.endpoint_file.write_text(json.dumps({**FULL, "weather": "fine"}))
    assert endpoint.read(home).host == "10.1.2.3"


def test_fields_an_older_pgjob_did_not_write_take_their_defaults(home):
    home.endpoint_file.write_text(json.dumps(
        {k: v for k, v in FULL.items() if k not in ("pooler", "sslrootcert")}))
    found = endpoint.read(home)
    assert found.pooler == "" and found.sslrootcert == str(home.secrets / "ca.crt")


def test_an_endpoint_file_others_can_change_is_refused_not_read(home):
    endpoint.publish(home, published(home))
    os.chmod(home.endpoint_file, 0o622)
    with pytest.raises(UsageError, match="can be changed by other users"):
        endpoint.read(home)


def test_a_link_in_place_of_the_endpoint_file_is_refused_not_followed(home, tmp_path):
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({**FULL, "host": "192.0.2.66"}))
    home.endpoint_file.symlink_to(theirs)
    with pytest.raises(UsageError, match="is a symbolic link"):
        endpoint.read(home)


@pytest.mark.parametrize("written,said", [
    (None, "no server has been published for it yet"),
    ("{", "is unreadable or half-written"),
    (json.dumps({"state": "withdrawn", "reason": "walltime reached"}),
     "its server was stopped (walltime reached)"),
    (json.dumps({"state": "serving", "host": "10.1.2.3"}), "its endpoint file is incomplete"),
])
def test_nothing_served_says_what_was_seen_and_how_to_start_a_server(home, written, said):
    if written is not None:
        home.endpoint_file.write_text(written)
    with pytest.raises(NotPublished) as caught:
        endpoint.wait_connectable(home, timeout=0)
    message = str(caught.value)
    assert said in message and str(home.path) in message
    assert "pgjob serve" in message and "--wait SECONDS" in message


# Rendering: URLs, libpq variables and shell lines carry the same parameters.

AWKWARD = dict(user="op@tuna", database="my/db", passfile="/h o/me's/secrets/app.pgpass",
               sslrootcert="/h o/me's/secrets/ca.crt")


def test_the_libpq_url_gives_libpq_every_parameter_back(home):
    found = published(home, **AWKWARD)
    assert conninfo_to_dict(found.libpq_url()) == {
        "host": "10.1.2.3", "port": "5433", "user": "op@tuna", "dbname": "my/db",
        "passfile": AWKWARD["passfile"], "sslmode": "verify-full",
        "sslrootcert": AWKWARD["sslrootcert"]}
    assert conninfo_to_dict(found.libpq_url("require"))["sslmode"] == "require"


def test_the_sqlalchemy_url_gives_sqlalchemy_every_parameter_back(home):
    url = make_url(published(home, **AWKWARD).sqlalchemy_url())
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "op@tuna", None, "10.1.2.3", 5433, "my/db")
    assert dict(url.query) == {"passfile": AWKWARD["passfile"], "sslmode": "verify-full",
                               "sslrootcert": AWKWARD["sslrootcert"]}


def test_no_password_is_in_any_rendering(home):
    found = published(home)
    home.app_passfile.write_text("*:*:*:optuna:s3cret-password\n")
    for text in (found.libpq_url(), found.sqlalchemy_url(), found.env_lines(),
                 found.to_json(), json.dumps(found.libpq_env())):
        assert "s3cret-password" not in text


def test_the_shell_lines_set_the_libpq_variables_and_the_url_in_a_real_shell(home):
    found = published(home, **AWKWARD)
    script = found.env_lines() + 'printf "%s\\0" "$PGHOST" "$PGPORT" "$PGDATABASE" ' \
        '"$PGUSER" "$PGPASSFILE" "$PGSSLMODE" "$PGSSLROOTCERT" "$PGJOB_URL"'
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"]})
    assert done.stdout.split("\0")[:-1] == [
        "10.1.2.3", "5433", "my/db", "op@tuna", AWKWARD["passfile"], "verify-full",
        AWKWARD["sslrootcert"], found.sqlalchemy_url()]


def test_the_json_rendering_is_what_a_reader_reads_back(home):
    found = published(home)
    home.endpoint_file.write_text(found.to_json())
    assert endpoint.read(home) == found
