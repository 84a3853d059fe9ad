"""Optuna's own tests, of the installed Optuna version, run against a pgjob server.

The tests come from Optuna's sdist (PyPI's wheel has none), fetched once per version into
a cache folder and never into this repository. Each run is a pytest subprocess with
pgjob_optuna_plugin.py loaded, its outcomes read from a JUnit XML report.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pgjob

PLUGIN_DIR = Path(__file__).resolve().parent
PLUGIN = "pgjob_optuna_plugin"
EXTRACTED = ("tests/", "pyproject.toml")  # pyproject: the pytest settings Optuna's tests expect


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgjob-conformance"


def optuna_tests(version: str | None = None) -> Path:
    """A folder with `tests/` (and pyproject.toml) of Optuna's sdist for `version` (default:
    the installed one), downloaded with pip on first use."""
    version = version or importlib.metadata.version("optuna")
    target = cache_dir() / f"optuna-{version}"
    if (target / "tests").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as work:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"optuna=={version}", "--no-binary",
             ":all:", "--no-deps", "--disable-pip-version-check", "-q", "-d", work],
            capture_output=True, text=True, timeout=600)
        sdists = list(Path(work).glob("optuna-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(f"could not download Optuna {version}'s sdist with pip "
                               f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        unpacked = Path(work) / "unpacked"
        with tarfile.open(sdists[0]) as sdist:
            top = f"optuna-{version}/"
            # Regular files only, under the named parts, no "..": nothing lands elsewhere
            # (this Python may predate tarfile's extraction filters).
            members = [m for m in sdist.getmembers() if m.isfile() and ".." not in
                       m.name.split("/") and m.name.startswith(tuple(top + p for p in EXTRACTED))]
            for member in members:
                member.name = member.name[len(top):]
                member.mode = 0o644
            sdist.extractall(unpacked, members=members)
        try:
            os.rename(unpacked, target)  # whole or not at all; a racing run may have won
        except OSError:
            if not (target / "tests").is_dir():
                raise
    return target


@dataclass(frozen=True)
class Outcome:
    state: str  # "passed", "failed" (failure or error), "skipped"; "not run" when missing
    message: str = ""


@dataclass
class Run:
    mode: str
    outcomes: dict[str, Outcome]
    seconds: float
    returncode: int
    output: str

    def ids(self, state: str) -> set[str]:
        return {t for t, o in self.outcomes.items() if o.state == state}


def _test_id(case: ET.Element) -> str:
    """`tests/x/test_y.py::Class::test_z[param]` from a JUnit testcase's classname and name."""
    parts = case.get("classname", "").split(".")
    module = max((i for i, p in enumerate(parts) if p.startswith("test_")), default=len(parts) - 1)
    path = "/".join(parts[:module + 1]) + ".py"
    return "::".join([path, *parts[module + 1:], case.get("name", "")])


def _error_lines(element: ET.Element) -> str:
    """What went wrong, in pytest's words: the crash line, else the traceback's "E" lines."""
    message = (element.get("message") or "").strip()
    if message:
        return message
    lines = [ln[1:].strip() for ln in (element.text or "").splitlines() if ln.startswith("E ")]
    return "\n".join(lines) or (element.text or "").strip()


def read_junit(path: Path) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = [e for e in case if e.tag in ("failure", "error")]
        skipped = case.find("skipped")
        if bad:
            outcomes[_test_id(case)] = Outcome("failed", _error_lines(bad[0]))
        elif skipped is not None:
            outcomes[_test_id(case)] = Outcome("skipped", _error_lines(skipped))
        else:
            outcomes[_test_id(case)] = Outcome("passed")
    return outcomes


def run(mode: str, homes: list[Path], paths: list[str], report: Path, *,
        timeout: float = 900) -> Run:
    """Optuna's tests under `paths` (relative to the sdist), with the storage modes of the
    mode set `mode` (see COMPARISONS) on the servers of `homes`."""
    root = optuna_tests()
    pgjob_root = str(Path(pgjob.__file__).resolve().parent.parent)  # the pgjob under test
    env = {**os.environ, "PGJOB_CONFORMANCE_MODES": mode,
           "PGJOB_CONFORMANCE_HOMES": os.pathsep.join(map(str, homes)),
           "PYTHONPATH": os.pathsep.join(
               [str(PLUGIN_DIR), pgjob_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", PLUGIN, "-q",
           "--color=no", "-o", "addopts=", f"--junitxml={report}", *paths]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:  # its tests count as not run
        returncode = -1
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                         for x in (exc.stdout, exc.stderr))
        output += f"\n(stopped after {timeout:.0f} s: {' '.join(paths)})"
    outcomes = read_junit(report) if report.exists() else {}
    return Run(mode, outcomes, time.monotonic() - started, returncode, output)


def merge(shards: list[Run]) -> Run:
    """One run's shards (which ran at the same time) as one run."""
    outcomes = {t: o for shard in shards for t, o in shard.outcomes.items()}
    return Run(shards[0].mode, outcomes, max(s.seconds for s in shards),
               max(s.returncode for s in shards), "\n".join(s.output for s in shards))


@dataclass(frozen=True)
class Comparison:
    """A pgjob run and its control: their mode sets (the plugin's MODES), and the storage
    mode by which their test ids differ ("pgjob" there is "rdb" in the control, and
    "cached_pgjob" "cached_rdb")."""
    pgjob: str
    control: str
    pgjob_mode: str
    control_mode: str

    @staticmethod
    def _swap(old: str, new: str, test_id: str) -> str:
        pattern = re.compile(rf"(?<=[\[-])(cached_)?{re.escape(old)}(?=[\]-])")
        return pattern.sub(lambda m: f"{m.group(1) or ''}{new}", test_id)

    def as_control_id(self, test_id: str) -> str:
        return self._swap(self.pgjob_mode, self.control_mode, test_id)

    def as_pgjob_id(self, test_id: str) -> str:
        return self._swap(self.control_mode, self.pgjob_mode, test_id)


COMPARISONS = {
    "rdb": Comparison("pgjob", "control", "pgjob", "rdb"),
    # whatever passes on Optuna's file journal must pass on pgjob's
    "journal": Comparison("pgjob_journal", "journal", "pgjob_journal", "journal"),
}


@dataclass(frozen=True)
class Difference:
    pattern: str  # a test id of the pgjob run; "*" stands for any text
    reason: str

    def covers(self, test_id: str) -> bool:
        # not fnmatch: test ids have brackets, which it reads as character sets
        return re.fullmatch(".*".join(map(re.escape, self.pattern.split("*"))),
                            test_id) is not None


DIFFERENCE_LINE = re.compile(r"^- `(?P<pattern>[^`]+)`: (?P<reason>\S.*)$")


def documented_differences(doc: Path) -> list[Difference]:
    """The deliberate differences listed in `doc`: lines "- `test id pattern`: reason" in
    its section "Deliberate differences". A list item there without a reason is an error."""
    found, inside = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("## "):
            inside = line.strip() == "## Deliberate differences"
        elif inside and line.startswith("- "):
            m = DIFFERENCE_LINE.match(line)
            if not m:
                raise ValueError(f"{doc}:{number}: a deliberate difference is written "
                                 f"- `test id`: reason; got {line!r}")
            found.append(Difference(m["pattern"], m["reason"]))
    return found


def covered_by(test_id: str, differences: list[Difference]) -> Difference | None:
    return next((d for d in differences if d.covers(test_id)), None)


def by_cause(outcomes: dict[str, Outcome]) -> str:
    """Tests grouped by the first lines of their errors, for a failure message."""
    groups: dict[str, list[str]] = {}
    for test_id, outcome in sorted(outcomes.items()):
        # without object addresses, so that one cause is one group
        message = re.sub(r" at 0x[0-9a-f]+", "", outcome.message)
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        cause = "\n    ".join([f"({outcome.state})", *lines[:3]])
        groups.setdefault(cause, []).append(test_id)
    return "\n".join(f"  {cause}\n" + "".join(f"      {t}\n" for t in tests)
                     for cause, tests in groups.items())
