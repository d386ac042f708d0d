"""The Connect framing and the parsing of what a sandbox prints, both fed by untrusted peers."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvm.serve import connect as c
from fcvm.serve import files


def test_envelopes_round_trip_and_the_end_of_stream_carries_the_error() -> None:
    data = c.envelope({"event": {"start": {"pid": 7}}}) + c.end_stream(c.ConnectError(c.Code.NOT_FOUND, "gone"))
    (flags1, first), (flags2, last) = c.split_envelopes(data)
    assert flags1 == 0 and json.loads(first) == {"event": {"start": {"pid": 7}}}
    assert flags2 == c.FLAG_END_STREAM and json.loads(last) == {"error": {"code": "not_found", "message": "gone"}}
    assert json.loads(c.split_envelopes(c.end_stream())[0][1]) == {}
    assert data[:5] == struct.pack(">BI", 0, len(first))


def test_a_stream_request_is_exactly_one_plain_message() -> None:
    assert c.stream_request(c.envelope({"process": {"cmd": "ls"}})) == {"process": {"cmd": "ls"}}
    for bad, code in ((b"", c.Code.INVALID_ARGUMENT), (c.envelope({}) * 2, c.Code.INVALID_ARGUMENT),
                      (c.envelope({}, c.FLAG_COMPRESSED), c.Code.UNIMPLEMENTED),
                      (c.envelope({}, c.FLAG_END_STREAM), c.Code.INVALID_ARGUMENT),
                      (c.envelope({})[:-1], c.Code.INVALID_ARGUMENT), (b"\0\0\0", c.Code.INVALID_ARGUMENT),
                      (struct.pack(">BI", 0, 2) + b"[]", c.Code.INVALID_ARGUMENT),
                      (struct.pack(">BI", 0, c.MAX_MESSAGE + 1), c.Code.RESOURCE_EXHAUSTED)):
        with pytest.raises(c.ConnectError) as error:
            c.stream_request(bad)
        assert error.value.code == code, bad[:16]


@given(st.binary(max_size=64))
def test_splitting_any_bytes_either_works_or_is_a_connect_error(data: bytes) -> None:
    with contextlib.suppress(c.ConnectError):
        c.split_envelopes(data)


def test_codes_answer_with_connects_http_statuses() -> None:
    assert c.Code.NOT_FOUND.http_status == 404 and c.Code.ALREADY_EXISTS.http_status == 409
    assert c.Code.UNIMPLEMENTED.http_status == 501 and c.Code.UNAUTHENTICATED.http_status == 401
    assert all(400 <= code.http_status < 600 for code in c.Code)


def test_timeouts_and_fields_follow_the_proto3_json_mapping() -> None:
    assert c.timeout_seconds("60000") == 60.0 and c.timeout_seconds(None) is None
    for bad in ("", "12345678901", "-1", "1.5", "\uff11\uff12"):
        with pytest.raises(c.ConnectError):
            c.timeout_seconds(bad)
    message = {"exitCode": 3, "size": "12", "stdin": "aGk", "url": "-_8=", "signal": "SIGNAL_SIGKILL", "n": 9}
    assert c.integer(message, "exitCode") == 3 and c.integer(message, "size") == 12
    assert c.integer({"exit_code": 4}, "exitCode", "exit_code") == 4
    assert c.bytes_field(message, "stdin") == b"hi" and c.bytes_field(message, "url") == b"\xfb\xff"
    names = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15}
    assert c.enum(message, "signal", names) == 9 and c.enum(message, "n", names) == 9
    for call in (lambda: c.integer({"x": True}, "x"), lambda: c.text({"x": 1}, "x"),
                 lambda: c.bytes_field({"x": "***"}, "x"), lambda: c.enum({"x": "SIGHUP"}, "x", names),
                 lambda: c.string_map({"x": {"a": 1}}, "x"), lambda: c.string_list({"x": "a"}, "x")):
        with pytest.raises(c.ConnectError) as error:
            call()
        assert error.value.code == c.Code.INVALID_ARGUMENT


def test_entries_are_parsed_from_stat_lines_and_garbage_is_skipped() -> None:
    output = (b"fcvm1 81a4 12 644 root root 1700000000 /tmp/a b.txt\n"
              b"fcvm1 41ed 4096 755 root wheel 1700000001 /tmp/dir\n"
              b"fcvm1 a1ff 7 777 root root 1700000002 /tmp/link\nfcvm1-link /etc/passwd\n"
              b"fcvm1 81a4 1 644 root root 1700000003 /tmp/new\nline\n"
              b"fcvm1 zz 1 644 root root 1 /tmp/bad\nfcvm1 81a4\n")
    found = list(files.entries(output))
    assert [e["path"] for e in found] == ["/tmp/a b.txt", "/tmp/dir", "/tmp/link", "/tmp/new\nline"]
    regular, directory, link, _ = found
    assert regular == {"name": "a b.txt", "type": "FILE_TYPE_FILE", "path": "/tmp/a b.txt", "size": "12",
                       "mode": 0o644, "permissions": "-rw-r--r--", "owner": "root", "group": "root",
                       "modifiedTime": "2023-11-14T22:13:20Z"}
    assert directory["type"] == "FILE_TYPE_DIRECTORY" and directory["permissions"] == "drwxr-xr-x"
    assert directory["mode"] == (1 << 31) | 0o755 and directory["group"] == "wheel"
    assert link["type"] == "FILE_TYPE_SYMLINK" and link["symlinkTarget"] == "/etc/passwd"


@given(st.binary(max_size=200))
def test_parsing_any_output_never_fails(output: bytes) -> None:
    for entry in files.entries(output):
        assert entry["type"].startswith("FILE_TYPE_")


def test_script_exit_codes_become_connect_codes() -> None:
    assert files.error_for(files.MISSING, "/x", b"").code == c.Code.NOT_FOUND
    assert files.error_for(files.EXISTS, "/x", b"").code == c.Code.ALREADY_EXISTS
    assert files.error_for(files.WRONG_KIND, "/x", b"").code == c.Code.INVALID_ARGUMENT
    other = files.error_for(1, "/x", b"mv: permission denied\n")
    assert other.code == c.Code.INTERNAL and "permission denied" in other.message
