"""The home's JSON records (serve.json, submitted.json, ...): a record pgjob cannot read
is one it does not have, whatever is in the file."""
import pytest


def test_a_record_written_is_read_back(home):
    home.write_record(home.serve_record, {"node": "node1", "pid": 7})
    assert home.read_record(home.serve_record) == {"node": "node1", "pid": 7}


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"null", b'{"node": "\xff"}', b'{"node"',
                                     b'{"node": ' + b"[" * 100_000],
                         ids=["empty", "a list", "null", "not UTF-8", "cut short",
                              "nested too deeply"])
def test_a_record_that_is_not_a_json_object_is_no_record(home, content):
    home.serve_record.write_bytes(content)
    assert home.read_record(home.serve_record) == {}


def test_a_missing_record_is_no_record(home):
    assert home.read_record(home.serve_record) == {}
