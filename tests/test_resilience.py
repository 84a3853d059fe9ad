"""Nothing lost: the lease, crash recovery, workers that follow a restarted server,
stale trials failed and retried, backups. On one machine; tests/test_slurm.py has the
same across nodes."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest

from conftest import Served, run_pgjob, trial_states as states
from dropin import WORKER_SCRIPT
from pgjob import endpoint, lease
from pgjob.home import open_home
from pgjob.waiting import until

pytestmark = pytest.mark.pg

FAST_HEARTBEATS = {"PGJOB_HEARTBEAT_INTERVAL": "1", "PGJOB_GRACE_PERIOD": "4"}


def start_worker(home_path, tmp_path, study, trials, pause, env=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    log = open(tmp_path / f"worker-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([sys.executable, str(script), str(home_path), study, str(trials),
                             str(pause)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}), log.name


def test_workers_carry_on_across_a_server_restart_on_another_port(home_path, tmp_path):
    served = Served(home_path, tmp_path / "serve.log")
    first = served.endpoint()
    worker, log = start_worker(home_path, tmp_path, "moving", 40, 0.1)
    assert until(lambda: states(first, "moving").get("COMPLETE", 0) >= 5, 60)
    assert served.stop() == 0
    # the next server finds its old port taken, as on a new node it would have a new address
    import socket
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen()
        time.sleep(2)  # the worker is now without a server
        served = Served(home_path, tmp_path / "serve.log")
        second = served.endpoint()
        assert second.port != first.port and second.generation == first.generation + 1
        assert worker.wait(120) == 0, open(log).read()
    assert "worker finished" in open(log).read()
    assert states(second, "moving") == {"COMPLETE": 40}
    served.stop()


def test_a_killed_worker_s_trial_is_failed_and_retried(home_path, tmp_path):
    served = Served(home_path, tmp_path / "serve.log", env=FAST_HEARTBEATS)
    found = served.endpoint()
    time.sleep(4.5)  # sweeps of a database with no tables yet: nothing to judge, no error
    assert "failed" not in served.log.read_text(), served.log.read_text()
    with found.connect() as conn:  # and the sweeps made no tables of the server's Optuna
        assert conn.execute("select to_regclass('version_info')").fetchone() == (None,)
    worker, _ = start_worker(home_path, tmp_path, "killed", 1, 600, env=FAST_HEARTBEATS)
    assert until(lambda: states(found, "killed").get("RUNNING") == 1, 60)
    time.sleep(1.5)  # at least one heartbeat recorded
    worker.kill()
    # the server's own sweep fails it (no other worker calls optimize) and queues a retry
    assert until(lambda: states(found, "killed") == {"FAIL": 1, "WAITING": 1}, 60), \
        states(found, "killed")
    study = optuna.load_study(study_name="killed", storage=found.sqlalchemy_url())
    retried = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING][0]
    assert retried.system_attrs["failed_trial"] == 0  # a retry of trial 0
    served.stop()


def test_running_trials_keep_their_heartbeat_through_a_restart(home_path, tmp_path):
    served = Served(home_path, tmp_path / "serve.log", env=FAST_HEARTBEATS)
    found = served.endpoint()
    worker, log = start_worker(home_path, tmp_path, "slow", 2, 8, env=FAST_HEARTBEATS)
    assert until(lambda: states(found, "slow").get("RUNNING") == 1, 60)
    served.stop()
    time.sleep(6)  # longer than the grace period, with no server to send heartbeats to
    served = Served(home_path, tmp_path / "serve.log", env=FAST_HEARTBEATS)
    assert worker.wait(120) == 0, open(log).read()
    assert states(served.endpoint(), "slow") == {"COMPLETE": 2}
    served.stop()


def test_a_crashed_server_recovers_every_committed_row(home_path, tmp_path):
    served = Served(home_path, tmp_path / "serve.log")
    found = served.endpoint()
    with found.connect() as conn:
        conn.execute("create table kept (v int)")
        conn.execute("insert into kept select generate_series(1, 1000)")
    postmaster = served.postmaster()
    served.process.kill()
    postmaster.kill()  # no shutdown checkpoint: a crash
    served.process.wait(30)
    served = Served(home_path, tmp_path / "serve.log")
    with served.endpoint().connect() as conn:
        assert conn.execute("select count(*) from kept").fetchone() == (1000,)
    assert "not properly shut down" in (home_path / "logs" / "postgresql.log").read_text()
    served.stop()


def test_a_stale_postmaster_pid_from_another_node_is_set_aside(home_path, tmp_path):
    (home_path / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n/elsewhere\n")
    served = Served(home_path, tmp_path / "serve.log")
    served.endpoint()
    assert "set aside a stale postmaster.pid" in served.log.read_text()
    assert list((home_path / "data").glob("postmaster.pid.stale-*"))
    served.stop()


def test_a_lease_renewed_by_another_node_refuses_a_second_server(home_path, tmp_path):
    home = open_home(home_path)
    held = lease.Lease(token="other", node="node-elsewhere", job_id="77", pid=1,
                       create_time=0.0, generation=4, renewed_at=time.time())
    lease._create(home, held)
    stop = time.monotonic() + 20

    def keep_renewing():
        nonlocal held
        while time.monotonic() < stop and not done.is_set():
            held = lease.renew(home, held)
            time.sleep(0.5)
    import threading
    done = threading.Event()
    renewer = threading.Thread(target=keep_renewing)
    renewer.start()
    try:
        refused = run_pgjob("serve", "--home", str(home_path), "--host", "127.0.0.1")
    finally:
        done.set()
        renewer.join()
    assert refused.returncode == 7
    assert "holds this home's lease" in refused.stderr and "node-elsewhere" in refused.stderr
    assert endpoint.read(home) is None  # nothing was published by the refused server


def test_an_expired_lease_of_a_dead_job_is_taken_over(home_path, tmp_path):
    home = open_home(home_path)
    lease._create(home, lease.Lease(token="dead", node="node-elsewhere", job_id="78", pid=1,
                                    create_time=0.0, generation=4,
                                    renewed_at=time.time() - 20, ttl=3))
    served = Served(home_path, tmp_path / "serve.log")
    served.endpoint()
    taken = lease.read(home)
    assert taken.token != "dead" and taken.generation >= 5  # renewed since: 6, 7, ...
    served.stop()


def test_a_server_whose_lease_is_stolen_stops_at_once(server, home_path):
    home = open_home(home_path)
    postmaster = server.postmaster()
    lease._create(home, lease.Lease(token="thief", node="node-elsewhere", job_id="79", pid=1,
                                    create_time=0.0, generation=99, renewed_at=time.time()))
    assert server.process.wait(30) == 9
    assert not postmaster.is_running()
    assert "lost the home's lease" in server.log.read_text()
    assert lease.read(home).token == "thief"  # left to its new holder
    assert endpoint.read(home) is None  # no client is sent to the server that stopped


def test_a_server_that_lost_its_lease_leaves_the_new_holder_s_endpoint(server, home_path):
    home = open_home(home_path)
    ours = server.endpoint()
    theirs = dataclasses.replace(ours, node="node-elsewhere", job_id="80", pid=1,
                                 generation=ours.generation + 1)
    endpoint.publish(home, theirs)
    lease._create(home, lease.Lease(token="thief", node="node-elsewhere", job_id="80", pid=1,
                                    create_time=0.0, generation=99, renewed_at=time.time()))
    assert server.process.wait(30) == 9
    assert endpoint.read_raw(home)["job_id"] == "80"  # the new holder's, untouched
    assert endpoint.read_raw(home)["state"] == endpoint.SERVING


def lease_files(home_path):
    return list((home_path / "run").glob("lease*.json"))


def test_a_lease_unreadable_for_a_while_keeps_the_server_serving(server, home_path):
    found = server.endpoint()
    unreadable = lease_files(home_path)
    for path in unreadable:
        path.chmod(0)
    try:
        assert until(lambda: "could not renew the lease" in server.log.read_text()
                     or server.process.poll() is not None, 60, 0.2)
        time.sleep(2)  # a little longer: still unreadable, still serving
        assert server.process.poll() is None, server.log.read_text()
        assert endpoint.read(open_home(home_path)) == found
        assert endpoint.check(found) is None
    finally:
        for path in unreadable:
            path.chmod(0o600)
    assert until(lambda: "the lease is renewed again" in server.log.read_text(), 60, 0.2)
    assert server.log.read_text().count("could not renew the lease") == 1  # said once
    assert server.stop() == 0


def test_a_lease_stamped_far_in_the_future_is_taken_over_after_a_window(home_path, tmp_path):
    home = open_home(home_path)
    lease._create(home, lease.Lease(token="ahead", node="node-elsewhere", job_id="81", pid=1,
                                    create_time=0.0, generation=4,
                                    renewed_at=time.time() + 10 * 86400, ttl=3))
    served = Served(home_path, tmp_path / "serve.log")
    served.endpoint(timeout=120)
    log = served.log.read_text()
    assert "stamped in the future" in log and "pgjob break-lease" in log
    assert "took the home's lease" in log and "not renewed for" in log
    assert lease.read(home).token != "ahead"
    assert served.stop() == 0


def test_break_lease_frees_a_home_at_once_and_is_refused_while_a_server_runs(home_path,
                                                                             tmp_path):
    home = open_home(home_path)
    lease._create(home, lease.Lease(token="ahead", node="node-elsewhere", job_id="82", pid=1,
                                    create_time=0.0, generation=4,
                                    renewed_at=time.time() + 10 * 86400))
    done = run_pgjob("break-lease", "--home", str(home_path))
    assert done.returncode == 0 and "released the home's lease" in done.stdout, done.stderr
    served = Served(home_path, tmp_path / "serve.log")
    found = served.endpoint()
    assert "watching it" not in served.log.read_text()  # no wait for the window
    held = lease.read(home)
    refused = run_pgjob("break-lease", "--home", str(home_path))
    assert refused.returncode == 7 and "pgjob stop" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert lease.read(home).token == held.token and endpoint.check(found) is None
    assert served.stop() == 0


def postmasters_on(data):
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = p.info["cmdline"] or []
        if "-D" in cmdline and str(data) in cmdline:
            found.add(p.info["pid"])
    return found


AT_THE_SIGNAL = """
import pathlib, sys, time
from pgjob.cli import main
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
sys.argv[:] = ["pgjob", *sys.argv[2:]]
main()
"""


def test_two_serves_started_at_once_run_one_postmaster(home_path, tmp_path):
    data, go = home_path / "data", tmp_path / "go"
    lock = home_path / "run" / "lease.lock"  # what a serve killed while taking it left
    lock.touch()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    logs = [tmp_path / f"serve-{n}.log" for n in (1, 2)]
    # both imported and waiting, then released within a millisecond of each other
    both = [subprocess.Popen([sys.executable, "-c", AT_THE_SIGNAL, str(go), "serve",
                              "--home", str(home_path), "--host", "127.0.0.1"],
                             stdout=open(log, "w"), stderr=subprocess.STDOUT)
            for log in logs]
    seen = set()
    try:
        time.sleep(3)
        go.touch()

        def settled():
            seen.update(postmasters_on(data))
            return sum(p.poll() is not None for p in both) == 1 and \
                endpoint.read(open_home(home_path)) is not None
        assert until(settled, 120, 0.05), [log.read_text() for log in logs]
        for _ in range(40):  # a while longer: the loser must not start one late
            seen.update(postmasters_on(data))
            time.sleep(0.05)
        loser = next(n for n, p in enumerate(both) if p.poll() is not None)
        winner = both[1 - loser]
        assert len(seen) == 1, seen
        assert both[loser].returncode == 7
        said = logs[loser].read_text()
        assert "pgjob: error:" in said and "Traceback" not in said  # AlreadyServing
        assert endpoint.read(open_home(home_path)).pid in seen
        winner.terminate()
        assert winner.wait(60) == 0
    finally:
        for p in both:
            if p.poll() is None:
                p.kill()
                p.wait(30)


def test_stop_during_a_stall_longer_than_the_lease_says_the_server_still_answers(
        server, home_path):
    found = server.endpoint()
    record = home_path / "run" / "serve.json"
    server.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(lease.TTL + 2)  # stalled longer than the lease lasts unrenewed
        done = run_pgjob("stop", "--home", str(home_path), "--wait", "3")
        assert done.returncode != 0 and "stopped" not in done.stdout
        assert "still answers" in done.stderr and "Traceback" not in done.stderr
        assert record.exists()
        assert endpoint.check(found) is None
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert server.process.wait(60) == 0  # the stop request it finds when it runs again
    assert not record.exists() and endpoint.read(open_home(home_path)) is None


def test_backup_on_demand_at_stop_and_restore_into_a_new_home(server, home_path, tmp_path):
    found = server.endpoint()
    study = optuna.create_study(storage=found.sqlalchemy_url(), study_name="kept")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    expected = [(t.params, t.value) for t in study.trials]
    done = run_pgjob("backup", "--home", str(home_path), check=True)
    made = done.stdout.strip().split()[-1]
    assert os.stat(made).st_mode & 0o777 == 0o600
    server.stop()
    dumps = sorted((home_path / "backups").glob("*.dump"))
    assert len(dumps) == 2  # on demand, and at the clean stop

    new_home = tmp_path / "restored"
    run_pgjob("restore", str(dumps[-1]), "--home", str(new_home), "--allow", "127.0.0.1/32",
              check=True)
    restored = Served(new_home, tmp_path / "restored.log")
    again = optuna.load_study(study_name="kept", storage=restored.endpoint().sqlalchemy_url())
    assert [(t.params, t.value) for t in again.trials] == expected
    restored.stop()


def test_backups_are_rotated(server, home_path):
    made = []
    for _ in range(4):
        done = run_pgjob("backup", "--home", str(home_path), env={"PGJOB_BACKUPS_KEEP": "2"},
                         check=True)
        made.append(done.stdout.strip().split()[-1])
        time.sleep(1.1)  # names carry the second
    kept = sorted(str(p) for p in (home_path / "backups").glob("*.dump"))
    assert kept == made[-2:]


def test_restore_refuses_an_existing_home(home_path, tmp_path):
    dump = tmp_path / "x.dump"
    dump.write_bytes(b"PGDMP")
    done = run_pgjob("restore", str(dump), "--home", str(home_path))
    assert done.returncode == 4 and "new home" in done.stderr


def test_a_moved_home_serves_and_is_found_at_its_new_place(home_path, tmp_path):
    served = Served(home_path, tmp_path / "serve.log")
    with served.endpoint().connect() as conn:
        conn.execute("create table kept (v int); insert into kept values (1)")
    served.stop()
    moved = tmp_path / "elsewhere" / "home"
    moved.parent.mkdir()
    home_path.rename(moved)
    served = Served(moved, tmp_path / "moved.log")
    found = served.endpoint()
    assert found.passfile == str(moved / "secrets" / "app.pgpass")
    with found.connect() as conn:
        assert conn.execute("select v from kept").fetchone() == (1,)
    url = run_pgjob("url", "--home", str(moved), check=True).stdout
    assert str(moved) in url
    served.stop()
