"""Optuna clients of the versions users really have, each in its own venv, against one
pgjob server.

The clients are plain Optuna scripts with the URL that `pgjob url` prints: they never import
pgjob (their venvs do not have it), as on a cluster where the workers' environment is not
pgjob's. Nothing is mocked. The versions:

- Optuna 2.10.1 with SQLAlchemy 1.4 and psycopg2 (`pgjob url --format libpq`, a
  postgresql:// URL): what a popular Hydra sweeper pins;
- Optuna 3.6 with SQLAlchemy 2.0 and psycopg2 (the same libpq URL);
- Optuna 4.2 with SQLAlchemy 2.1 and psycopg2 (the libpq URL written postgresql+psycopg2://,
  since SQLAlchemy 2.1 reads postgresql:// as psycopg 3);
- the current release (5.0.0 when this was written) with psycopg 3 (`pgjob url`'s default
  postgresql+psycopg:// URL).

"One pgjob server" is one `pgjob serve` of one home, so one study database: pgjob serves
one database per home, and its application role may not create others. Optuna keeps one
schema per database, and its versions do not share every schema: each Optuna runs only on
its own newest alembic revision. Optuna 2.10's is v2.6.0.a; every Optuna from 3.2 to 5.0 has
v3.2.0.a. So the honest test is the path a user takes:

1. a study begun by Optuna 2.10 workers (its tables made by 2.10, the first client), read
   by 2.10's own CLI (`optuna studies`); a newer Optuna refuses those tables and says to
   upgrade; `optuna storage upgrade` by the current release migrates them, the 2.10 study
   goes on under 3.6, 4.2 and 5.0 together, and 2.10 is then refused in turn;
2. on a database no client has touched, whichever newer Optuna comes first makes the
   tables, and the others share them and the study.

Between the two, Optuna's tables are dropped as the application role (their owner), which is
the database as it is before any client. The venvs are built with pip from PyPI once and
kept under /var/tmp/pgjob-optuna-venvs (PGJOB_OPTUNA_VENVS), one per pinned requirement
set and Python, made by whoever runs the test (about 70 s the first time, all four at once
with nothing in pip's cache; then the module takes about 35 s).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Served, drop_optuna_schema, run_pgjob

pytestmark = [pytest.mark.pg, pytest.mark.slow]

VENVS = Path(os.environ.get("PGJOB_OPTUNA_VENVS", "/var/tmp/pgjob-optuna-venvs"))
OLD_HEAD, NEW_HEAD = "v2.6.0.a", "v3.2.0.a"


@dataclass(frozen=True)
class Client:
    name: str
    version: str  # what its optuna.__version__ starts with
    requirements: tuple[str, ...]
    scheme: str  # of the URL it is given: the libpq URL's, or with the driver named
    driver: str  # the one SQLAlchemy picks for that URL

    def key(self) -> str:
        pinned = "\n".join((sys.version, *self.requirements))
        return f"{self.name}-{hashlib.sha256(pinned.encode()).hexdigest()[:12]}"


# SQLAlchemy before 2.1 reads postgresql:// as psycopg2; 2.1 reads it as psycopg 3, so with
# psycopg2 there the driver is named. Optuna before 4.5 cannot find the best trial on
# PostgreSQL through psycopg 3 (see the last test), so those run on psycopg2.
OPTUNA_2 = Client("optuna-2.10", "2.10.1", ("optuna==2.10.1", "sqlalchemy<2", "psycopg2-binary"),
                  "postgresql", "psycopg2")
OPTUNA_3 = Client("optuna-3.6", "3.6.", ("optuna==3.6.*", "sqlalchemy<2.1", "psycopg2-binary"),
                  "postgresql", "psycopg2")
OPTUNA_4 = Client("optuna-4.2", "4.2.", ("optuna==4.2.*", "psycopg2-binary", "psycopg[binary]"),
                  "postgresql+psycopg2", "psycopg2")
CURRENT = Client("optuna-5.0", "5.0.0", ("optuna==5.0.0", "psycopg[binary]"),
                 "postgresql+psycopg", "psycopg")  # PyPI's newest when this was written
NEWER = (OPTUNA_3, OPTUNA_4, CURRENT)

# Plain Optuna, the way a user's worker script is written; it also says whether pgjob could
# have been imported, and which database driver SQLAlchemy picked for the URL.
WORKER = """
import importlib.util, json, sys
import optuna, sqlalchemy.engine

url, name, n_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
study = optuna.create_study(storage=url, study_name=name, load_if_exists=True)
study.optimize(lambda trial: (trial.suggest_float("x", -10, 10) - 2) ** 2, n_trials=n_trials)
again = optuna.load_study(study_name=name, storage=url)
print(json.dumps({
    "optuna": optuna.__version__,
    "driver": sqlalchemy.engine.make_url(url).get_dialect().driver,
    "pgjob_importable": importlib.util.find_spec("pgjob") is not None,
    "trials": len(again.trials),
    "values": [t.value for t in again.trials],
    "best_value": again.best_value,
}))
"""


def _build(client: Client) -> tuple[Path, float]:
    """The client's venv, built once per requirement set; a half-built one (no `complete`
    marker) is built again. Returns its folder and the seconds the build took (0: kept).
    A lock per client keeps two test runs on this machine from building it at once."""
    venv = VENVS / client.key()
    with open(VENVS / f"{client.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / "complete").exists():
            return venv, 0.0
        for stale in VENVS.glob(f"{client.name}-*"):  # other requirements, or half-built
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                               "--disable-pip-version-check", *client.requirements],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise AssertionError(f"pip install {' '.join(client.requirements)} into {venv} "
                                 f"failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        (venv / "complete").write_text("\n".join(client.requirements) + "\n")
        return venv, time.monotonic() - started


@pytest.fixture(scope="module")
def venvs() -> dict[Client, Path]:
    try:
        VENVS.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        pytest.fail(f"cannot make {VENVS} for the Optuna venvs ({exc}); set "
                    "PGJOB_OPTUNA_VENVS to a folder you can write")
    if not os.access(VENVS, os.W_OK | os.X_OK):
        pytest.fail(f"{VENVS} (for the Optuna venvs) is not writable by this user (owner uid "
                    f"{VENVS.stat().st_uid}); remove it or set PGJOB_OPTUNA_VENVS")
    clients = (OPTUNA_2, *NEWER)
    with ThreadPoolExecutor(len(clients)) as pool:
        built = dict(zip(clients, pool.map(_build, clients)))
    for client, (venv, seconds) in built.items():
        print(f"{client.name}: {venv} " + (f"built in {seconds:.1f} s" if seconds else "kept"))
    return {client: venv for client, (venv, _) in built.items()}


@pytest.fixture(scope="module")
def served(template_home, tmp_path_factory):
    """One `pgjob serve` for the whole module (taken off the per-test cleanup list)."""
    work = tmp_path_factory.mktemp("versions")
    home = work / "home"
    shutil.copytree(template_home, home, symlinks=True)
    server = Served(home, work / "serve.log")
    Served.started.remove(server)
    server.endpoint()
    yield server
    server.stop()


def client_env() -> dict[str, str]:
    """The environment of a worker that has nothing of pgjob's: no PYTHONPATH to it (and
    the clients run outside the checkout, whose pgjob/ `python -c` would find)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def url(served, scheme: str) -> str:
    """What `pgjob url` prints: its default (postgresql+psycopg://), or its libpq URL with
    the scheme a client needs."""
    if scheme == "postgresql+psycopg":
        return run_pgjob("url", "--home", str(served.home_path), check=True).stdout.strip()
    libpq = run_pgjob("url", "--home", str(served.home_path), "--format", "libpq",
                      check=True).stdout.strip()
    assert libpq.startswith("postgresql://")
    return scheme + libpq[len("postgresql"):]


def run_client(venvs, served, client: Client, study: str, n_trials: int = 3,
               scheme: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(venvs[client] / "bin" / "python"), "-c", WORKER,
                           url(served, scheme or client.scheme), study, str(n_trials)],
                          capture_output=True, text=True, timeout=300, env=client_env(),
                          cwd=served.home_path.parent)


def optimize(venvs, served, client: Client, study: str, n_trials: int = 3) -> dict:
    """Run `n_trials` trials of `study` with this client; what it saw afterwards."""
    done = run_client(venvs, served, client, study, n_trials)
    assert done.returncode == 0, f"{client.name} failed:\n{done.stdout}\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["optuna"].startswith(client.version)
    assert result["pgjob_importable"] is False
    assert result["driver"] == client.driver
    assert result["best_value"] == min(result["values"])
    return result


def optuna_cli(venvs, served, client: Client, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venvs[client] / "bin" / "optuna"), *args, "--storage",
                           url(served, client.scheme)], capture_output=True, text=True, timeout=300,
                          env=client_env(), cwd=served.home_path.parent)


def schema(served) -> dict | None:
    done = run_pgjob("status", "--home", str(served.home_path), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["optuna_schema"]


def test_a_study_begun_by_optuna_2_10_is_upgraded_and_carried_on_by_newer_ones(venvs, served):
    drop_optuna_schema(served.endpoint())  # as a fresh home has it, whatever ran before
    assert schema(served) is None

    first = optimize(venvs, served, OPTUNA_2, "hydra-sweep")
    assert first["trials"] == 3
    assert schema(served) == {"alembic_revision": OLD_HEAD, "schema_version": 12,
                              "library_version": "2.10.1"}
    listed = optuna_cli(venvs, served, OPTUNA_2, "studies")
    assert listed.returncode == 0 and "hydra-sweep" in listed.stdout, listed.stderr

    refused = run_client(venvs, served, CURRENT, "hydra-sweep")
    assert refused.returncode != 0
    assert "optuna storage upgrade" in refused.stderr, refused.stderr
    print(f"{CURRENT.name} on {OLD_HEAD}: {refused.stderr.strip().splitlines()[-1]}")

    upgraded = optuna_cli(venvs, served, CURRENT, "storage", "upgrade")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    # version_info now names the Optuna that upgraded the tables
    assert schema(served) == {"alembic_revision": NEW_HEAD, "schema_version": 12,
                              "library_version": CURRENT.version}

    total = 3
    for client in NEWER:  # each carries the same study on, seeing every trial before it
        result = optimize(venvs, served, client, "hydra-sweep")
        total += 3
        assert result["trials"] == total
        assert result["values"][:3] == first["values"]

    stale = run_client(venvs, served, OPTUNA_2, "hydra-sweep")
    assert stale.returncode != 0
    assert "no longer compatible with the table schema" in stale.stderr, stale.stderr
    print(f"{OPTUNA_2.name} on {NEW_HEAD}: {stale.stderr.strip().splitlines()[-1]}")


@pytest.mark.parametrize("first", [OPTUNA_3, CURRENT], ids=lambda c: c.name)
def test_the_newer_versions_share_the_tables_whichever_makes_them(venvs, served, first):
    drop_optuna_schema(served.endpoint())  # a study database no client has used yet
    made = optimize(venvs, served, first, "shared")
    made_by = schema(served)
    assert made_by["alembic_revision"] == NEW_HEAD
    assert made_by["library_version"] == made["optuna"]

    total = 3
    for client in NEWER:
        if client is not first:
            total += 3
            assert optimize(venvs, served, client, "shared")["trials"] == total
    assert schema(served) == made_by


def test_optuna_before_4_5_on_psycopg_3_fails_at_the_first_best_trial(venvs, served):
    """Why the clients before 4.5 above run on psycopg2: Optuna's best-trial query compares
    its enum column with a string that SQLAlchemy's psycopg 3 dialect casts to VARCHAR,
    which PostgreSQL refuses (Optuna's issue 6096, fixed in 4.5). The worker dies as soon as
    Optuna logs the first finished trial with the best so far."""
    done = run_client(venvs, served, OPTUNA_4, "psycopg3-before-4.5",
                      scheme="postgresql+psycopg")
    assert done.returncode != 0
    assert "operator does not exist: trialvaluetype = character varying" in done.stderr
