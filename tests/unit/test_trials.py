"""trials: which declared trials the server fails (is_dead, from the heartbeat and the
job), which of a journal home's heartbeat rows are of running trials (split_beats), and
which kind of trials a sweep judges."""
import pytest

from pgjob import trials
from pgjob.schedulers import QueueState
from pgjob.schema import kind_of_studies
from pgjob.trials import Declared, is_dead, split_beats


def declared(silent: float, job: str = "slurm:7", grace: int = 120) -> Declared:
    return Declared(trial_id=1, study_id=1, job=job, grace=grace, silent=silent)


@pytest.mark.parametrize("state", ["RUNNING", "SUSPENDED", "CONFIGURING"])
def test_a_trial_whose_job_still_runs_is_kept_however_late_its_heartbeat(state):
    assert not is_dead(declared(silent=10_000), state)


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                   "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "PENDING"])
def test_a_trial_whose_job_has_ended_is_failed_at_once(state):
    assert is_dead(declared(silent=0.5), state)


def test_without_a_job_the_grace_period_decides():
    assert not is_dead(declared(silent=119, job=""), None)
    assert is_dead(declared(silent=121, job=""), None)
    assert is_dead(declared(silent=6, grace=5), None)


def test_a_scheduler_that_cannot_tell_leaves_it_to_the_heartbeat(monkeypatch):
    """UNKNOWN (forgotten, or slurmctld down) must not fail every trial at once.
    (schedulers.query is replaced: the answer, not squeue, is what is under test.)"""
    monkeypatch.setattr(trials.schedulers, "query",
                        lambda name, job_id: QueueState("UNKNOWN", None, ""))
    assert trials.job_state("slurm:7") is None

    def broken(name, job_id):
        raise FileNotFoundError("squeue")
    monkeypatch.setattr(trials.schedulers, "query", broken)
    assert trials.job_state("slurm:7") is None
    assert trials.job_state("") is None


def test_a_job_id_that_looks_like_an_option_is_never_handed_to_the_scheduler(monkeypatch):
    asked = []
    monkeypatch.setattr(trials.schedulers, "query",
                        lambda name, job_id: asked.append(job_id) or QueueState("RUNNING", 1, ""))
    assert trials.job_state("pbs:-x --help") is None
    assert trials.job_state("slurm:12 34") is None
    assert trials.job_state("pbs:1234.pbs1") == "RUNNING"
    assert asked == ["1234.pbs1"]


def test_a_job_running_again_after_a_requeue_has_lost_the_trial_of_its_earlier_run(
        monkeypatch):
    """Requeued under its id and released at once, a job runs again before any sweep saw
    it pending: the trial its first run took is the worker's no more. (The answers of
    squeue and scontrol are replaced: what is judged from them is under test.)"""
    state, restarts, asked = "RUNNING", 1, []
    monkeypatch.setattr(trials.schedulers, "query",
                        lambda name, job_id: QueueState(state, 60, "node2"))
    monkeypatch.setattr(trials.schedulers, "restarts",
                        lambda name, job_id: asked.append(job_id) or restarts)
    assert trials.job_state("slurm:7@0") == "REQUEUED"
    assert is_dead(declared(silent=1, job="slurm:7@0"), "REQUEUED")
    assert trials._why(declared(1, job="slurm:7@0"), "REQUEUED") == \
        "its job slurm:7 was requeued and runs again without it"
    assert trials.job_state("slurm:7@1") == "RUNNING"  # the trial of the run going on
    assert trials.job_state("slurm:7") == "RUNNING"  # recorded without its run: kept
    restarts = None
    assert trials.job_state("slurm:7@0") == "RUNNING"  # scontrol could not tell
    state = "PENDING"
    assert trials.job_state("slurm:7@0") == "PENDING"  # not running: no need to ask
    assert asked == ["7", "7", "7"]
    assert trials.job_state("slurm:7@x") is None and trials.job_state("slurm:7@-1") is None


def test_a_journal_home_s_beats_are_judged_only_for_trials_its_journal_says_run():
    beats = [(3, "slurm:7", 120, 5.0), (4, "", 120, 400.0), (9, "", 60, 1.0)]
    running = {3: 0, 4: 1}  # trial 9 finished (or its study was deleted)
    declared, gone = split_beats(beats, running)
    assert declared == [Declared(3, 0, "slurm:7", 120, 5.0), Declared(4, 1, "", 120, 400.0)]
    assert gone == [9]
    assert [t.trial_id for t in declared if is_dead(t, None)] == [4]


def test_no_running_trial_leaves_every_row_to_tidy():
    assert split_beats([(1, "", 120, 0.0)], {}) == ([], [1])
    assert split_beats([], {1: 0}) == ([], [])


@pytest.mark.parametrize("in_use, setting, judged", [
    ([], "rdb", "rdb"), ([], "journal", "journal"),  # no studies yet: the setting
    (["journal"], "rdb", "journal"),  # a worker's PGJOB_STORAGE that serve was not given
    (["rdb"], "journal", "rdb"),
    (["rdb", "journal"], "journal", "journal"),  # both (every worker is refused): setting
])
def test_the_sweep_judges_the_kind_of_studies_the_database_holds(in_use, setting, judged):
    assert kind_of_studies(in_use, setting) == judged
