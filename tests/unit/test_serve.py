"""serve's decisions, as a user would see them: why serving ends, whether a renewal chain
goes on, when serve stops by itself, when it gives up restarting, how it shuts down."""
from pgjob import serve

NOW = 1_000_000.0


def test_the_first_stop_reason_seen_is_kept():
    assert serve.stop_reason("SIGTERM", stop_requested=True, stop_at=NOW - 1, now=NOW) == "SIGTERM"


def test_a_stop_request_stops_serving():
    assert serve.stop_reason("", stop_requested=True, stop_at=None, now=NOW) == "pgjob stop"


def test_serving_goes_on_until_the_self_scheduled_stop():
    assert serve.stop_reason("", stop_requested=False, stop_at=NOW + 1, now=NOW) == ""
    assert serve.stop_reason("", stop_requested=False, stop_at=NOW, now=NOW) == serve.TIME_LIMIT
    assert serve.stop_reason("", stop_requested=False, stop_at=None, now=NOW) == ""


def test_the_time_limit_does_not_end_a_renewal_chain():
    for reason in ("SIGUSR1", "SIGUSR2", serve.TIME_LIMIT, ""):
        assert not serve.ends_chain(reason, job_end=NOW + 3600, now=NOW), reason


def test_a_cancel_or_pgjob_stop_ends_the_chain():
    for reason in ("pgjob stop", "SIGINT", "SIGHUP"):
        assert serve.ends_chain(reason, job_end=NOW + 3600, now=NOW), reason


def test_a_sigterm_near_the_jobs_end_is_the_time_limit_not_a_cancel():
    assert serve.ends_chain("SIGTERM", job_end=NOW + serve.WALLTIME_MARGIN + 60, now=NOW)
    assert not serve.ends_chain("SIGTERM", job_end=NOW + serve.WALLTIME_MARGIN - 60, now=NOW)
    assert serve.ends_chain("SIGTERM", job_end=None, now=NOW)  # no end known: a cancel


def test_serve_stops_by_itself_a_margin_before_the_end():
    assert serve.own_stop_time(NOW + 7200, NOW, stop_margin=300) == NOW + 7200 - 300


def test_a_short_job_serves_half_its_time_before_stopping_by_itself():
    # 400 s left with a 300 s margin: stopping at once would make every short job useless
    assert serve.own_stop_time(NOW + 400, NOW, stop_margin=300) == NOW + 200


def test_restarts_count_only_within_the_window():
    old = NOW - serve.RESTART_WINDOW - 1
    assert serve.recent_restarts([old, NOW - 10], NOW) == [NOW - 10, NOW]
    assert serve.recent_restarts([], NOW) == [NOW]


def test_shutdown_is_immediate_when_another_serve_holds_the_home():
    assert serve.shutdown_kind(lease_lost=True, fenced=True) == "immediate"
    assert serve.shutdown_kind(lease_lost=False, fenced=True) == "fenced"
    assert serve.shutdown_kind(lease_lost=False, fenced=False) == "clean"


def test_a_chore_runs_when_due_and_never_with_period_zero():
    ran = []
    chore = serve.Every(10, lambda: ran.append(1), due=NOW + 5)
    chore.run_if_due(NOW)
    chore.run_if_due(NOW + 5)
    chore.run_if_due(NOW + 14)
    assert ran == [1] and chore.due == NOW + 15
    never = serve.Every(0, lambda: ran.append(2))
    never.run_if_due(NOW)
    assert ran == [1]
