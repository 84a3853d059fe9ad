"""`pgjob --version` and shell completion, through real subprocesses as a shell runs them."""
import os
import subprocess

from conftest import pgjob_cmd, run_pgjob
from pgjob import __version__


def complete(line: str, shell: str = "bash") -> list[str]:
    """What the shell would offer after `line`, asked of pgjob as click's scripts ask it."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    done = subprocess.run(pgjob_cmd(), capture_output=True, text=True, timeout=60,
                          env={**os.environ, "_PGJOB_COMPLETE": f"{shell}_complete",
                               "COMP_WORDS": " ".join(words), "COMP_CWORD": str(len(words) - 1)})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_version_names_the_program_and_its_version():
    done = run_pgjob("--version", check=True)
    assert done.stdout.strip() == f"pgjob, version {__version__}"


def test_completion_prints_a_script_for_bash_and_zsh():
    bash = run_pgjob("completion", "bash", check=True).stdout
    assert "_PGJOB_COMPLETE=bash_complete" in bash
    assert "complete -o nosort -F _pgjob_completion pgjob" in bash
    zsh = run_pgjob("completion", "zsh", check=True).stdout
    assert zsh.startswith("#compdef pgjob") and "_PGJOB_COMPLETE=zsh_complete" in zsh


def test_clicks_own_variable_prints_the_same_bash_script():
    done = subprocess.run(pgjob_cmd(), capture_output=True, text=True, timeout=60,
                          env={**os.environ, "_PGJOB_COMPLETE": "bash_source"})
    assert done.stdout.strip() == run_pgjob("completion", "bash").stdout.strip()


def test_bash_completes_commands_and_options():
    offered = [w.split(",")[-1] for w in complete("pgjob st")]
    assert sorted(offered) == ["status", "stop"]
    assert "--workers" in [w.split(",")[-1] for w in complete("pgjob init --wo")]


def test_the_bash_script_works_in_bash(tmp_path):
    """Source the script in a real bash and call its function as `complete -F` would."""
    script = tmp_path / "pgjob.bash"
    script.write_text(run_pgjob("completion", "bash", check=True).stdout)
    shim = tmp_path / "pgjob"
    shim.write_text(f"#!/bin/sh\nexec {' '.join(pgjob_cmd())} \"$@\"\n")
    shim.chmod(0o755)
    done = subprocess.run(
        ["bash", "--norc", "-c", f'PATH={tmp_path}:$PATH; source {script}; '
         'COMP_WORDS=(pgjob st); COMP_CWORD=1; _pgjob_completion pgjob; echo "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=60)
    assert sorted(done.stdout.split()) == ["status", "stop"], done.stderr
