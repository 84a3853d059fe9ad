"""trials.is_dead: which declared trials the server fails, from the heartbeat and the job."""
import pytest

from pgjob import trials
from pgjob.scheduler import QueueState
from pgjob.trials import Declared, is_dead


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
    (scheduler.query is replaced: the answer, not squeue, is what is under test.)"""
    monkeypatch.setattr(trials.scheduler, "query",
                        lambda name, job_id: QueueState("UNKNOWN", None, ""))
    assert trials.job_state("slurm:7") is None

    def broken(name, job_id):
        raise FileNotFoundError("squeue")
    monkeypatch.setattr(trials.scheduler, "query", broken)
    assert trials.job_state("slurm:7") is None
    assert trials.job_state("") is None


def test_a_job_id_that_looks_like_an_option_is_never_handed_to_the_scheduler(monkeypatch):
    asked = []
    monkeypatch.setattr(trials.scheduler, "query",
                        lambda name, job_id: asked.append(job_id) or QueueState("RUNNING", 1, ""))
    assert trials.job_state("pbs:-x --help") is None
    assert trials.job_state("slurm:12 34") is None
    assert trials.job_state("pbs:1234.pbs1") == "RUNNING"
    assert asked == ["1234.pbs1"]
