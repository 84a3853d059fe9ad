"""The home's lease without a server: generations, take-over rules, renewal, fencing."""
import dataclasses
import json
import os
import re
import threading
import time

import psutil
import pytest

from pgjob import lease, schedulers
from pgjob.errors import AlreadyServing, LeaseLost
from pgjob.home import Home
from pgjob.waiting import until


@pytest.fixture
def home(tmp_path):
    (tmp_path / "run").mkdir(mode=0o700)
    return Home(tmp_path)


@pytest.fixture
def quick(monkeypatch):
    """A short margin, so that watching a lease takes a second or two."""
    monkeypatch.setattr(lease, "SKEW", 0.2)
    monkeypatch.setattr(lease, "TTL", 0.3)
    monkeypatch.setattr(lease, "RENEWAL_SLACK", 0.5)


def elsewhere(generation, renewed_at=None, ttl=30.0, **extra):
    return lease.Lease(token="other", node="node-elsewhere", job_id="77", pid=1,
                       create_time=0.0, generation=generation,
                       renewed_at=time.time() if renewed_at is None else renewed_at,
                       ttl=ttl, **extra)


def generations(home):
    return sorted(int(p.stem.split("-")[1]) for p in home.run.glob("lease-*.json"))


def test_take_renew_release_each_write_a_new_generation(home):
    mine = lease.acquire(home, "1")
    assert mine.generation == 1 and lease.read(home) == mine
    renewed = lease.renew(home, mine)
    assert renewed.generation == 2 and renewed.token == mine.token
    lease.release(home, renewed)
    assert lease.read(home).released
    again = lease.acquire(home, "2")  # a released lease is free at once
    assert again.generation == 4 and again.token != mine.token


def test_old_generations_are_pruned(home):
    held = lease.acquire(home, "1")
    for _ in range(10):
        held = lease.renew(home, held)
    assert generations(home) == list(range(held.generation - lease.KEEP, held.generation + 1))


def test_of_many_takers_at_once_exactly_one_wins(home, monkeypatch):
    # All eight have found the lease free before any writes: a taker that looked after the
    # winner wrote would watch a live holder for a ttl instead (another test's case).
    start, write = threading.Barrier(8), threading.Barrier(8, timeout=10)
    create = lease._create
    monkeypatch.setattr(lease, "_create", lambda *args: (write.wait(), create(*args)))
    won, refused = [], []

    def take():
        start.wait()
        try:
            won.append(lease.acquire(home, "1"))
        except AlreadyServing as exc:
            refused.append(str(exc))
    takers = [threading.Thread(target=take) for _ in range(8)]
    for t in takers:
        t.start()
    for t in takers:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all("took this home's lease first" in r for r in refused)


def test_a_holder_whose_next_generation_was_taken_has_lost(home):
    mine = lease.acquire(home, "1")
    lease._create(home, elsewhere(2))
    with pytest.raises(LeaseLost, match="lost the home's lease"):
        lease.renew(home, mine)
    assert lease.read(home).token == "other"  # left to its new holder


def test_a_holder_behind_a_later_generation_has_lost(home):
    mine = lease.acquire(home, "1")
    lease._create(home, elsewhere(9))
    with pytest.raises(LeaseLost):
        lease.renew(home, mine)


def test_a_passing_read_error_is_not_a_loss(home):
    mine = lease.acquire(home, "1")
    lease._path(home, 1).unlink()
    lease._path(home, 1).mkdir()  # reading it fails, as EACCES or ESTALE would
    with pytest.raises(OSError) as raised:
        lease.renew(home, mine)
    assert not isinstance(raised.value, LeaseLost)


@pytest.mark.parametrize("text", [b"\xff\xfe", b"", b"[1, 2]", b'{"token": 3}',
                                  b"{" + b'"a": ' * 10 + b"1",
                                  json.dumps({**vars(elsewhere(1)), "ttl": 1e9}).encode(),
                                  json.dumps({**vars(elsewhere(1)), "pid": "1"}).encode(),
                                  json.dumps({**vars(elsewhere(1)), "pid": -1}).encode(),
                                  json.dumps({**vars(elsewhere(1)), "pid": 10**30}).encode(),
                                  b'{"renewed_at": NaN}', b'{"token": ' + b"[" * 100_000])
def test_a_malformed_lease_is_reported_then_taken_over_when_unchanged(home, quick, text):
    (home.run / "lease-5.json").write_bytes(text)
    current = lease.read_current(home)
    assert current.lease is None and "not a valid lease" in current.problem
    assert lease.read(home) is None
    assert lease.acquire(home, "1").generation == 6


def test_a_lease_renewed_while_watched_refuses_and_names_the_way_out(home, quick):
    lease._create(home, elsewhere(3))
    renewer = threading.Timer(0.3, lease._create, (home, elsewhere(4)))
    renewer.start()
    with pytest.raises(AlreadyServing) as refused:
        lease.acquire(home, "1")
    renewer.join()
    assert "holds this home's lease" in str(refused.value)
    assert "node-elsewhere" in str(refused.value) and "pgjob break-lease" in str(refused.value)


def test_a_lease_stamped_far_in_the_future_is_taken_over_after_the_window(home, quick,
                                                                          caplog):
    lease._create(home, elsewhere(3, renewed_at=time.time() + 10 * 86400, ttl=0.3))
    caplog.set_level("INFO", "pgjob.lease")
    began = time.monotonic()
    assert lease.acquire(home, "1").generation == 4
    assert time.monotonic() - began >= 0.3 + lease.SKEW
    assert "in the future" in caplog.text and "not renewed for" in caplog.text


def test_an_expired_lease_is_taken_at_once(home):
    lease._create(home, elsewhere(3, renewed_at=time.time() - 100, ttl=10))
    assert lease.acquire(home, "1").generation == 4


def test_a_lease_just_past_its_ttl_waits_for_the_skew_margin(home):
    # 5 s past its 30 s ttl: within the margin for clocks, so it is watched, not taken
    lease._create(home, elsewhere(3, renewed_at=time.time() - 35))
    assert not lease._free_because(lease.read_current(home))


def test_the_check_before_taking_can_refuse(home):
    def answering():
        raise AlreadyServing("a server answers")
    with pytest.raises(AlreadyServing, match="a server answers"):
        lease.acquire(home, "1", before_taking=answering)
    assert generations(home) == []


def test_a_legacy_lease_file_counts_as_generation_zero(home):
    old_format = vars(elsewhere(4, renewed_at=time.time() - 100))
    del old_format["released"]
    (home.run / "lease.json").write_text(json.dumps(old_format))
    taken = lease.acquire(home, "1")
    assert taken.generation == 1 and not (home.run / "lease.json").exists()


def test_break_releases_an_unrenewed_lease_and_its_holder_then_loses_it(home, quick):
    lease._create(home, elsewhere(3, renewed_at=time.time() + 86400, ttl=0.3))
    said = lease.break_held(home)
    assert "released the home's lease" in said and lease.read(home).released
    with pytest.raises(LeaseLost, match="break-lease"):
        lease.renew(home, elsewhere(3))
    assert lease.acquire(home, "1").generation == 5


def test_break_refuses_a_lease_that_is_being_renewed(home, quick):
    lease._create(home, elsewhere(3, ttl=1.0))
    renewer = threading.Timer(0.3, lease._create, (home, elsewhere(4, ttl=1.0)))
    renewer.start()
    with pytest.raises(AlreadyServing, match="changed while watched"):
        lease.break_held(home)
    renewer.join()
    assert not lease.read(home).released


def test_break_refuses_a_live_holder_on_this_node(home):
    mine = lease.acquire(home, "1")
    with pytest.raises(AlreadyServing, match="still runs on this node"):
        lease.break_held(home)
    assert lease.read(home) == mine


def keeper_of(home, monkeypatch, ttl=1.2):
    monkeypatch.setattr(lease, "SKEW", 0.6)
    fenced = threading.Event()
    held = lease.acquire(home, "1", ttl=ttl)
    return lease.Keeper(home, held, fence=fenced.set), fenced


def test_the_keeper_renews_in_the_background(home, monkeypatch):
    keeper, fenced = keeper_of(home, monkeypatch)
    keeper.start()
    assert until(lambda: lease.read(home).generation >= 4, 10)
    final = keeper.stop()
    assert final.generation >= 4 and not keeper.lapsed and not fenced.is_set()


def test_the_keeper_retries_a_passing_error_then_fences_when_it_outlasts_the_ttl(
        home, monkeypatch):
    keeper, fenced = keeper_of(home, monkeypatch)
    real = lease.renew
    broken = threading.Event()
    broken.set()

    def flaky(h, held):
        if broken.is_set():
            raise PermissionError(13, "Permission denied")
        return real(h, held)
    monkeypatch.setattr(lease, "renew", flaky)
    keeper.start()
    assert until(lambda: keeper.trouble, 5)
    broken.clear()  # it passes well within the ttl: nothing more happens
    assert until(lambda: not keeper.trouble, 5)
    assert not keeper.lapsed and not fenced.is_set()
    broken.set()
    assert until(fenced.is_set, 10)
    assert "could not renew the home's lease" in keeper.lapsed
    assert "Permission denied" in keeper.lapsed
    keeper.stop()


def test_the_keeper_fences_at_once_when_the_lease_is_taken(home, monkeypatch):
    keeper, fenced = keeper_of(home, monkeypatch)
    lease._create(home, elsewhere(2))
    keeper.start()
    assert until(fenced.is_set, 10)
    assert "lost the home's lease" in keeper.lost
    keeper.stop()


def test_a_renewal_after_a_stall_is_safe_both_ways(home, monkeypatch):
    keeper, _ = keeper_of(home, monkeypatch, ttl=0.3)
    time.sleep(0.5)  # longer than the ttl, as if stopped: nobody took it, so it renews
    keeper.renew_now()
    assert lease.read(home).token == keeper.lease.token
    time.sleep(0.5)
    lease._create(home, elsewhere(keeper.lease.generation + 1))  # this time, a taker
    with pytest.raises(LeaseLost):
        keeper.renew_now()


def test_lease_files_are_private(home):
    lease.acquire(home, "1")
    assert os.stat(lease._path(home, 1)).st_mode & 0o777 == 0o600


def test_an_unrenewed_lease_whose_holder_runs_on_this_node_is_never_taken(home, quick):
    me = psutil.Process()
    lease._create(home, lease.Lease(token="stalled", node=schedulers.node_name(), job_id="",
                                    pid=me.pid, create_time=me.create_time(), generation=2,
                                    renewed_at=time.time(), ttl=0.3))
    with pytest.raises(AlreadyServing, match="still runs on this node"):
        lease.acquire(home, "1")
    assert lease.read(home).token == "stalled"


def test_a_full_disk_does_not_fence_since_no_taker_can_write_either(home, monkeypatch):
    keeper, fenced = keeper_of(home, monkeypatch, ttl=0.6)
    errors = [OSError(28, "No space left on device")]

    def failing(h, held):
        raise errors[0]
    monkeypatch.setattr(lease, "renew", failing)
    keeper.start()
    assert until(lambda: keeper.trouble, 5)
    time.sleep(0.6 + lease.SKEW)  # past the ttl and the fence
    assert not keeper.lapsed and not fenced.is_set()
    errors[0] = OSError(5, "Input/output error")  # one that may be this node's alone
    assert until(fenced.is_set, 10)
    assert "Input/output error" in keeper.lapsed
    keeper.stop()


def test_releasing_a_lease_another_serve_has_taken_leaves_theirs_alone(home):
    mine = lease.acquire(home, "1")
    theirs = elsewhere(mine.generation + 1)
    lease._create(home, theirs)
    lease.release(home, mine)
    assert lease.read(home) == theirs and generations(home) == [1, 2]


def test_the_holder_is_known_gone_only_for_a_dead_process_on_this_node(home):
    here, me = schedulers.node_name(), psutil.Process()
    alive = dataclasses.replace(elsewhere(1), node=here, pid=me.pid,
                                create_time=me.create_time())
    assert alive.holder_alive_here() and not alive.holder_gone()
    # the same pid started at another time is another process: ours is gone
    reused = dataclasses.replace(alive, create_time=me.create_time() - 1000)
    assert reused.holder_gone() and not reused.holder_alive_here()
    # on another node nothing is known: neither gone nor alive
    assert not elsewhere(1).holder_gone() and not elsewhere(1).holder_alive_here()


def test_the_lease_is_described_as_the_user_needs_it(home):
    assert lease.describe_current(home) == "no lease"
    lease._create(home, elsewhere(3, renewed_at=time.time() - 42))
    said = lease.describe_current(home)
    assert re.fullmatch(r"generation 3, node node-elsewhere, job 77, pid 1, renewed 4[23] s ago",
                        said), said
    lease._create(home, elsewhere(4, released=True))
    assert "released 0 s ago" in lease.describe_current(home)
    lease._create(home, elsewhere(5, renewed_at=time.time() + 3600))
    assert "in the future by its holder's clock" in lease.describe_current(home)
    lease._create(home, dataclasses.replace(elsewhere(6, released=True),
                                            token=lease.BROKEN + "x"))
    assert "broken with `pgjob break-lease`" in lease.describe_current(home)
    (home.run / "lease-7.json").write_text("{")
    assert "not a valid lease" in lease.describe_current(home)
