"""pgjob's own settings and what the scheduler tells a job: pure logic, no server."""
import pytest

from pgjob import netinfo, scheduler
from pgjob.errors import UsageError
from pgjob.home import Home, resolve_path
from pgjob.settings import Settings

MB = 1024 * 1024


def test_settings_round_trip_through_toml(tmp_path):
    home = Home(tmp_path)
    settings = Settings(port=6000, workers=12, allow=("10.0.0.0/8",), pg_bin="/opt/pg/bin")
    home.save_settings(settings)
    assert home.settings() == settings
    assert (tmp_path / "pgjob.toml").stat().st_mode & 0o777 == 0o600


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    home = Home(tmp_path)
    home.save_settings(Settings(port=6000))
    monkeypatch.setenv("PGJOB_PORT", "6001")
    monkeypatch.setenv("PGJOB_ALLOW", "10.1.0.0/16, 10.2.0.0/16")
    assert home.settings().port == 6001
    assert home.settings().allow == ("10.1.0.0/16", "10.2.0.0/16")


def test_a_bad_number_names_the_setting(tmp_path, monkeypatch):
    home = Home(tmp_path)
    home.save_settings(Settings())
    monkeypatch.setenv("PGJOB_WORKERS", "many")
    with pytest.raises(UsageError, match="workers"):
        home.settings()


def test_home_comes_from_option_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PGJOB_HOME", str(tmp_path / "env"))
    assert resolve_path(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_path(None) == tmp_path / "env"
    monkeypatch.delenv("PGJOB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path(None) == tmp_path / ".pgjob" / "default"


def test_slurm_job_memory_per_node_and_per_cpu():
    job = scheduler.current({"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "c17",
                             "SLURM_MEM_PER_NODE": "2048"})
    assert (job.scheduler, job.job_id, job.node) == ("slurm", "42", "c17")
    assert job.memory_bytes == 2048 * MB
    job = scheduler.current({"SLURM_JOB_ID": "43", "SLURM_MEM_PER_CPU": "500",
                             "SLURM_CPUS_ON_NODE": "4"})
    assert job.memory_bytes == 2000 * MB


def test_outside_a_scheduler_the_machine_memory_is_the_bound():
    job = scheduler.current({})
    assert job.scheduler == "none" and job.job_id == ""
    assert job.memory_bytes > 0 and job.end_time is None


def test_other_schedulers_are_detected():
    assert scheduler.detect({"PBS_JOBID": "7.pbs"}) == "pbs"
    assert scheduler.detect({"LSB_JOBID": "9"}) == "lsf"


def test_time_left_from_the_job_end():
    job = scheduler.current({"SLURM_JOB_ID": "1", "SLURM_JOB_END_TIME": "1000"})
    assert job.time_left(now=400) == 600


def test_cgroup_v2_and_v1_limits(tmp_path):
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "job" / "memory.max").write_text("1073741824\n")
    v2 = tmp_path / "v2"
    v2.write_text("0::/job\n")
    assert scheduler.cgroup_memory(v2, root) == 1024 * MB
    (root / "memory" / "slurm").mkdir(parents=True)
    (root / "memory" / "slurm" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    v1 = tmp_path / "v1"
    v1.write_text("4:memory:/slurm\n1:cpu:/\n")
    assert scheduler.cgroup_memory(v1, root) is None  # "unlimited"


def test_published_address_is_never_loopback_when_a_network_exists():
    assert netinfo.address(host="10.9.9.9") == "10.9.9.9"
    nets = netinfo.networks()
    if nets:
        assert not netinfo.address().startswith("127.")
    assert all(not n.startswith("127.") for n in nets)


def test_unknown_interface_lists_the_real_ones():
    with pytest.raises(UsageError, match="no such interface"):
        netinfo.address(interface="nosuch0")


@pytest.mark.parametrize("text,seconds", [("1-02:03:04", 93784), ("02:03:04", 7384),
                                          ("03:04", 184), ("UNLIMITED", None),
                                          ("NOT_SET", None)])
def test_slurm_time_left_is_parsed(text, seconds):
    assert scheduler.parse_slurm_duration(text) == seconds
