"""Optuna's own storage and study tests, run against pgjob's storages and their controls.

The tests of the installed Optuna version (from its sdist, cached outside the repository)
run four times. On an rdb home, with `pgjob.optuna_storage` (plain and inside Optuna's
_CachedStorage), and as its control with a plain RDBStorage on the URL of an identical
server. On a journal home, with `pgjob.optuna_storage` (Optuna's JournalStorage on
pgjob's backend), and as its control with Optuna's JournalFileBackend in a file.
Whatever passes on a control must pass on pgjob's storage, unless
docs/optuna-conformance.md lists it as a deliberate difference, with its reason.
Nothing is mocked. docs/optuna-conformance.md says what is left out and why.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conformance import optuna_suite as suite
from conftest import Served, skip_unless_ci
from pgjob.initialize import init

pytestmark = [pytest.mark.pg, pytest.mark.slow]

DOC = Path(__file__).resolve().parent.parent / "docs" / "optuna-conformance.md"

# Each shard runs in a pytest of its own, all shards of all runs at once, each on servers
# of its own: the tests mostly wait for round trips and heartbeat sleeps, so on 2 cores
# the module takes ~2.5 min, where the rdb control alone in one pytest took 3.6. A
# shard's server count is how many storages its tests open at once (test_copy_study
# copies between two).
NOT_HEARTBEAT = ["tests/storages_tests", "--ignore", "tests/storages_tests/test_heartbeat.py"]
SHARDS = {
    "heartbeat": (["tests/storages_tests/test_heartbeat.py"], 1),
    "storages": (NOT_HEARTBEAT, 1),
    "study": (["tests/study_tests"], 2),
    # the journal runs', in one pytest each: they take well under a minute, no sleeps
    "storages+study": ([*NOT_HEARTBEAT, "tests/study_tests"], 2),
}
# The runs: the mode sets of both comparisons (suite.COMPARISONS), their shards, and
# the kind of home their storages are on: Optuna's file journal, the journal's control,
# needs none. Optuna's JournalStorage has no heartbeat, so the journal runs leave out
# Optuna's heartbeat tests (their modes deselect them anyway, see the plugin).
RUNS = {
    "pgjob": (("heartbeat", "storages", "study"), "rdb"),
    "control": (("heartbeat", "storages", "study"), "rdb"),
    "pgjob_journal": (("storages+study",), "journal"),
    "journal": (("storages+study",), None),
}
# Left out, with why (each also says so in docs/optuna-conformance.md).
LEFT_OUT = {
    "tests/storages_tests/test_grpc.py": "needs grpcio: it puts Optuna's gRPC proxy in front "
                                         "of the storage, which no pgjob worker does",
}
WORKERS = 32  # max_connections 72: control RDBStorages keep up to 15 connections each
JOBS = [(mode, shard) for mode, (shards, _) in RUNS.items() for shard in shards]


@pytest.fixture(scope="module")
def optuna_tests() -> Path:
    try:
        return suite.optuna_tests()
    except RuntimeError as exc:
        skip_unless_ci(f"Optuna's tests could not be fetched: {exc}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Servers for every shard of every run: (mode set, shard) -> homes (none for the
    file journal)."""
    work = tmp_path_factory.mktemp("conformance")
    homes: dict[tuple[str, str], list[Path]] = {job: [] for job in JOBS}
    by_kind: dict[str, list[Path]] = {"rdb": [], "journal": []}
    for (mode, shard), home_list in homes.items():
        kind = RUNS[mode][1]
        for _ in range(SHARDS[shard][1] if kind else 0):
            home_list.append(work / f"home-{sum(map(len, by_kind.values()))}")
            by_kind[kind].append(home_list[-1])
    # initdb runs once: the others are copies of a home that is not served yet, and the
    # journal homes of one that `pgjob init --storage journal` made a journal home
    rdb, journal = by_kind["rdb"], by_kind["journal"]
    init(rdb[0], allow=("127.0.0.1/32",), workers=WORKERS)
    shutil.copytree(rdb[0], journal[0], symlinks=True)
    init(journal[0], storage="journal")
    for kind in (rdb, journal):
        for path in kind[1:]:
            shutil.copytree(kind[0], path, symlinks=True)
    served = []
    for path in rdb + journal:
        served.append(Served(path, path.with_name(f"{path.name}.serve.log")))
        Served.started.remove(served[-1])  # shared by this module's tests: stopped below
    try:
        for server in served:
            server.endpoint()
        yield homes
    finally:
        for server in served:
            if server.process.poll() is None:
                server.stop()


@pytest.fixture(scope="module")
def runs(optuna_tests, servers, tmp_path_factory) -> dict[str, suite.Run]:
    """All runs, each the union of its shards. Every shard has new servers, so pgjob's
    storage meets the database as `pgjob init` and `serve` leave it."""
    reports = tmp_path_factory.mktemp("conformance-reports")
    left_out = [arg for path in LEFT_OUT for arg in ("--ignore", path)]

    def one(mode: str, shard: str) -> suite.Run:
        paths, _ = SHARDS[shard]
        return suite.run(mode, servers[mode, shard], [*paths, *left_out],
                         reports / f"{mode}-{shard}.xml")

    with ThreadPoolExecutor(len(JOBS)) as pool:
        done = dict(zip(JOBS, pool.map(lambda job: one(*job), JOBS)))
    for (mode, shard), run in done.items():
        print(f"optuna conformance: {mode} {shard}: {run.seconds:.0f} s, "
              f"{ {s: len(run.ids(s)) for s in ('passed', 'failed', 'skipped')} }")
    return {mode: suite.merge([done[mode, shard] for shard in shards])
            for mode, (shards, _) in RUNS.items()}


COMPARISONS = pytest.mark.parametrize("comparison", list(suite.COMPARISONS.values()),
                                      ids=list(suite.COMPARISONS))


@COMPARISONS
def test_both_runs_collect_the_same_tests(runs, comparison):
    """A broken plugin or a missing test dependency must not pass by running nothing."""
    control, pgjob = runs[comparison.control], runs[comparison.pgjob]
    for run in (control, pgjob):
        assert len(run.outcomes) >= 100, (
            f"the {run.mode} run reported only {len(run.outcomes)} tests (exit "
            f"{run.returncode}); its output ends:\n{run.output[-3000:]}")
    mapped = {comparison.as_control_id(t) for t in pgjob.outcomes}
    assert mapped == set(control.outcomes), (
        f"only in the control: {sorted(set(control.outcomes) - mapped)[:20]}; "
        f"only in the pgjob run: {sorted(mapped - set(control.outcomes))[:20]}")


@COMPARISONS
def test_the_control_passes_optuna_tests(runs, comparison):
    """A failure of the control (a plain RDBStorage, Optuna's file journal) is the
    harness's (emptying, servers, a dependency), and it hides that test from the
    comparison below."""
    control = runs[comparison.control]
    failed = {t: control.outcomes[t] for t in control.ids("failed")}
    assert not failed, f"the control ({control.mode}) failed:\n" + suite.by_cause(failed)


@COMPARISONS
def test_pgjob_storage_passes_what_the_control_passes(runs, comparison):
    """Every test that passes on the control passes with pgjob's storage, except the
    deliberate differences listed in docs/optuna-conformance.md."""
    differences = suite.documented_differences(DOC)
    broken = {t: o for t, o in _pgjob_only_failures(runs, comparison).items()
              if not suite.covered_by(t, differences)}
    assert not broken, (f"{len(broken)} of Optuna's tests pass on the control "
                        f"({comparison.control}) but not on pgjob's storage "
                        f"({comparison.pgjob}):\n" + suite.by_cause(broken))


def test_every_documented_difference_is_still_one(runs):
    """A difference listed in the docs that no longer fails is stale: the docs must say
    what the storage does now."""
    failing = {t: o for comparison in suite.COMPARISONS.values()
               for t, o in _pgjob_only_failures(runs, comparison).items()}
    stale = [d.pattern for d in suite.documented_differences(DOC)
             if not any(suite.covered_by(t, [d]) for t in failing)]
    assert not stale, (f"docs/optuna-conformance.md lists differences that no longer fail "
                       f"on pgjob's storage; remove them: {stale}")


def _pgjob_only_failures(runs, comparison) -> dict[str, suite.Outcome]:
    """The pgjob run's outcome of every test its control passed and it did not pass (or
    never ran), by pgjob test id."""
    pgjob = runs[comparison.pgjob].outcomes
    not_run = suite.Outcome("not run", "the pgjob run stopped before it or never collected it")
    found = {comparison.as_pgjob_id(t): pgjob.get(comparison.as_pgjob_id(t), not_run)
             for t in runs[comparison.control].ids("passed")}
    return {t: o for t, o in found.items() if o.state != "passed"}
