"""`pgjob url --format hydra`: the URL as one Hydra override, whatever the home's path."""
from pgjob.endpoint import Endpoint


def endpoint_in(home: str) -> Endpoint:
    return Endpoint(host="10.0.0.7", port=5432, database="optuna", user="optuna",
                    passfile=f"{home}/secrets/app.pgpass", node="n7", job_id="1",
                    scheduler="slurm", pid=1, started_at=0.0, generation=1,
                    system_identifier="1", sslrootcert=f"{home}/secrets/ca.crt")


def test_the_override_quotes_the_libpq_url_once_and_nothing_in_it_ends_the_quotes():
    found = endpoint_in("/p/it's $HOME\\x ?a=1&b=2")
    override = found.hydra_override()
    assert override == f"hydra.sweeper.storage='{found.libpq_url()}'"
    value = override.split("=", 1)[1][1:-1]
    assert not set(value) & set("'\"\\$ ")  # Hydra's quote, escape and interpolation
    assert "/p/it%27s%20%24HOME%5Cx%20%3Fa%3D1%26b%3D2/secrets/app.pgpass&sslmode=" in value
