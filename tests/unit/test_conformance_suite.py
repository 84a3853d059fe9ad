"""The pure parts of the Optuna conformance harness: matching the two runs' test ids,
reading a JUnit report, and the list of deliberate differences in the docs."""
from pathlib import Path

import pytest

from conformance import optuna_suite as suite

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite>
<testcase classname="tests.storages_tests.test_storages.TestStorage" name="test_a[pgjob]"/>
<testcase classname="tests.storages_tests.test_heartbeat" name="test_b[cached_pgjob-0]">
  <failure message="TypeError: no">long traceback</failure></testcase>
<testcase classname="tests.study_tests.test_study" name="test_c[pgjob]">
  <error>setup went wrong
E   RuntimeError: the fixture broke
E   second line</error></testcase>
<testcase classname="tests.study_tests.test_study" name="test_d[pgjob-pgjob]">
  <skipped message="needs grpc"/></testcase>
</testsuite></testsuites>
"""


def test_pgjob_ids_map_onto_the_controls_mode_by_mode():
    rdb = suite.COMPARISONS["rdb"]
    assert rdb.as_control_id("t.py::test_copy[cached_pgjob-pgjob]") == \
        "t.py::test_copy[cached_rdb-rdb]"
    assert rdb.as_control_id("t.py::test_x[None-pgjob]") == "t.py::test_x[None-rdb]"
    # a parameter that merely contains the word is left alone
    assert rdb.as_control_id("t.py::test_x[pgjobs]") == "t.py::test_x[pgjobs]"
    assert rdb.as_pgjob_id("rdb_tests/t.py::test_copy[cached_rdb-rdb]") == \
        "rdb_tests/t.py::test_copy[cached_pgjob-pgjob]"


def test_journal_ids_map_onto_optuna_s_file_journal():
    journal = suite.COMPARISONS["journal"]
    assert journal.as_control_id("j.py::test_append[pgjob_journal-None]") == \
        "j.py::test_append[journal-None]"
    assert journal.as_pgjob_id("t.py::TestStorage::test_a[journal]") == \
        "t.py::TestStorage::test_a[pgjob_journal]"
    # Optuna's other journal modes are not the control's
    assert journal.as_pgjob_id("t.py::test_b[journal_redis]") == "t.py::test_b[journal_redis]"


def test_junit_outcomes_with_their_errors(tmp_path: Path):
    report = tmp_path / "r.xml"
    report.write_text(JUNIT)
    got = suite.read_junit(report)
    assert got == {
        "tests/storages_tests/test_storages.py::TestStorage::test_a[pgjob]":
            suite.Outcome("passed"),
        "tests/storages_tests/test_heartbeat.py::test_b[cached_pgjob-0]":
            suite.Outcome("failed", "TypeError: no"),
        "tests/study_tests/test_study.py::test_c[pgjob]":
            suite.Outcome("failed", "RuntimeError: the fixture broke\nsecond line"),
        "tests/study_tests/test_study.py::test_d[pgjob-pgjob]":
            suite.Outcome("skipped", "needs grpc"),
    }


def test_differences_are_read_from_their_section_only(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Page\n\n- `not/this.py::test`: a list elsewhere\n\n"
                   "## Deliberate differences\n\nIntro.\n\n"
                   "- `t.py::test_pickle[*pgjob]`: the reason\n"
                   "\n## Next\n- `t.py::later`: no\n")
    found = suite.documented_differences(doc)
    assert found == [suite.Difference("t.py::test_pickle[*pgjob]", "the reason")]
    assert suite.covered_by("t.py::test_pickle[cached_pgjob]", found) == found[0]
    assert suite.covered_by("t.py::test_pickle[pgjob]", found) == found[0]
    # brackets are the test id's, not a character set
    assert suite.covered_by("t.py::test_pickle[j]", found) is None
    assert suite.covered_by("t.py::test_other[pgjob]", found) is None


def test_a_difference_without_its_reason_is_an_error(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text("## Deliberate differences\n\n- `t.py::test_x[pgjob]`:\n")
    with pytest.raises(ValueError, match="doc.md:3: a deliberate difference is written"):
        suite.documented_differences(doc)


def test_the_docs_list_parses():
    doc = Path(__file__).resolve().parents[2] / "docs" / "optuna-conformance.md"
    assert "## Deliberate differences" in doc.read_text()
    assert all(d.reason for d in suite.documented_differences(doc))
