"""schema.socket_url: the URL Optuna's storage gets for the server's private socket."""
from pathlib import Path

from sqlalchemy.engine import make_url

from pgjob.settings import Settings
from pgjob.schema import socket_url

AWKWARD = "it's 100% a b+c&d=e#f?g"


def test_every_part_of_the_socket_url_reaches_libpq_as_it_was():
    settings = Settings(user=f"u {AWKWARD}", database=f"d {AWKWARD}")
    socket_dir = Path(f"/tmp/{AWKWARD}")
    passfile = Path(f"/home/{AWKWARD}/secrets/app.pgpass")
    url = make_url(socket_url(socket_dir, 5432, settings, passfile))
    assert (url.username, url.database) == (settings.user, settings.database)
    assert dict(url.query) == {"host": str(socket_dir), "port": "5432",
                               "passfile": str(passfile)}
