"""health: a journal's studies as Optuna's replay numbers them, the codes the status's SQL
reads in the logs, and how a journal home's status reads."""
import optuna
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from pgjob import health
from pgjob.health import Status, render, study_spans


def test_the_codes_in_the_status_s_sql_are_optuna_s():
    assert (health.CREATE_STUDY, health.DELETE_STUDY, health.CREATE_TRIAL,
            health.SET_TRIAL_STATE_VALUES) == (
        JournalOperation.CREATE_STUDY, JournalOperation.DELETE_STUDY,
        JournalOperation.CREATE_TRIAL, JournalOperation.SET_TRIAL_STATE_VALUES)
    assert health.TRIAL_STATES == {s.value: s.name for s in TrialState}
    assert set(health.FINISHED) == {s.value for s in TrialState if s.is_finished()}


def test_study_ids_are_numbered_as_optuna_s_replay_numbers_them():
    logs = [  # (log id, op code, study name, study id)
        (0, 0, "a", None), (1, 0, "a", None),  # a second worker's create: no new study
        (2, 0, "b", None), (5, 1, None, 0),  # a deleted
        (6, 0, "a", None),  # a again: a new study, a new id
        (7, 1, None, 0),  # deleting a deleted study changes nothing
        (8, 1, None, 9)]  # nor does deleting one that never was
    assert study_spans(logs) == {0: ("a", 0, 5), 1: ("b", 2, None), 2: ("a", 6, None)}

    replay = optuna.storages.journal._storage.JournalStorageReplayResult("other-")
    replay.apply_logs([{"op_code": op, "worker_id": "w", "study_name": name,
                        "study_id": study_id, "directions": [1]}
                       for _, op, name, study_id in logs])
    assert {s._study_id: s.study_name for s in replay.get_all_studies()} == {1: "b", 2: "a"}


def journal_status(journal) -> str:
    return render(Status(facts={"home": "/h", "storage": "journal", "journal": journal,
                                "studies": {"s": {"COMPLETE": 2, "RUNNING": 1}}}))


def test_a_journal_home_s_status_says_how_long_its_journal_is_and_never_no_tables():
    shown = journal_status({"logs": 5012, "snapshots": {"5.0.0": 4000}})
    assert "storage:     journal, 5012 logs; snapshot at log 4000 (Optuna 5.0.0)" in shown
    assert "study s: 2 complete, 1 running" in shown
    assert "optuna:" not in shown and "no Optuna tables" not in shown
    assert "storage:     journal, 12 logs; no snapshot" in journal_status(
        {"logs": 12, "snapshots": {}})
    assert "storage:     journal, no journal yet (the first worker makes its tables)" in \
        journal_status(None)
    assert "journal unreadable (permission denied)" in journal_status(
        {"error": "permission denied"})
