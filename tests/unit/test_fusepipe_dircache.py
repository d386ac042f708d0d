"""The relay's directory knowledge: which LOOKUPs and GETATTRs it answers itself, and when it must not."""

from __future__ import annotations

import errno
import struct

import pytest

from fcvm_wire.fusepipe import proto
from fcvm_wire.fusepipe.dircache import DirCache

pytestmark = pytest.mark.unit

DIR = 7
ATTR_OUT = proto.ATTR_OUT.pack(1, 0, 0, *([0] * 16))  # a fuse_attr_out valid for 1 s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(opcode: int, unique: int, nodeid: int, body: bytes = b"") -> bytes:
    return proto.IN_HEADER.pack(proto.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def lookup(unique: int, name: bytes, nodeid: int = DIR) -> bytes:
    return request(proto.LOOKUP, unique, nodeid, name + b"\0")


def create(unique: int, name: bytes, nodeid: int = DIR) -> bytes:
    return request(proto.CREATE, unique, nodeid, struct.pack("<IIII", 0, 0o644, 0, 0) + name + b"\0")


def hint(code: int, unique: int, body: bytes, nodeid: int = DIR, valid_s: float = 1.0) -> bytes:
    return proto.pack_notify(code, proto.HINT_HEAD.pack(nodeid, unique, int(valid_s * 1e9)) + body)


def names(*listed: bytes) -> bytes:
    return b"".join(n + b"\0" for n in listed)


class Relay:
    """Drives a DirCache as the relay loop does: requests out, hints and notifications in."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.cache = DirCache(self.clock)
        self.in_flight: dict[int, bytes] = {}

    def send(self, msg: bytes) -> bytes | None:
        """The relay's own answer, or None after sending `msg` to the server."""
        opcode, unique, nodeid = struct.unpack_from("<IQQ", msg, 4)
        answer = self.cache.answer(opcode, unique, nodeid, msg)
        if answer is None:
            self.cache.sent(opcode, unique, nodeid, msg)
            self.in_flight[unique] = msg
        return answer

    def receive(self, msg: bytes) -> None:
        _, code, unique = proto.OUT_HEADER.unpack_from(msg, 0)
        if unique:
            self.in_flight.pop(unique, None)
        elif code in proto.HINTS:
            self.cache.hint(code, msg, self.in_flight.items())
        else:
            self.cache.notified(code, msg)

    def absent(self, unique: int, name: bytes) -> bool:
        """True if the relay answered LOOKUP `name` with a negative entry itself (one the kernel keeps no longer
        than the listing is valid)."""
        answer = self.send(lookup(unique, name))
        if answer is None:
            self.receive(proto.pack_reply(unique, -errno.ENOENT))
            return False
        assert proto.OUT_HEADER.unpack_from(answer, 0) == (16 + proto.ENTRY_OUT.size, 0, unique)
        nodeid, _, entry_valid, _, entry_nsec, _ = struct.unpack_from("<QQQQII", answer, 16)
        assert nodeid == 0 and 0 < entry_valid + entry_nsec / 1e9 <= 1.0
        return True


def listed(relay: Relay, unique: int, *present: bytes) -> None:
    """A negative LOOKUP that the server answers with the directory's names."""
    assert relay.send(lookup(unique, b"missing")) is None
    relay.receive(hint(proto.HINT_DIR_NAMES, unique, names(*present)))
    relay.receive(proto.pack_reply(unique, -errno.ENOENT))


def test_lookups_of_names_the_directory_lacks_are_answered_without_the_server() -> None:
    relay = Relay()
    listed(relay, 2, b"a", b"b")
    assert relay.absent(4, b"c")
    assert not relay.absent(6, b"a")  # present: the server gives its entry
    assert relay.absent(8, b"c")
    assert not relay.absent(10, b"n" * 256)  # the server's answer is ENAMETOOLONG


def test_names_created_through_the_mount_are_never_answered_absent() -> None:
    relay = Relay()
    listed(relay, 2, b"a")
    relay.send(create(4, b"new"))  # sent after the listing was taken
    assert not relay.absent(6, b"new")


def test_a_create_still_in_flight_when_the_listing_arrives_counts_as_present() -> None:
    relay = Relay()
    assert relay.send(lookup(2, b"missing")) is None
    assert relay.send(create(4, b"racing")) is None  # the server runs it after the listing was read
    relay.receive(hint(proto.HINT_DIR_NAMES, 2, names(b"a")))
    assert not relay.absent(6, b"racing")
    assert relay.absent(8, b"other")


def test_truncated_hints_and_notifications_are_ignored() -> None:
    relay = Relay()
    relay.send(create(2, b"f"))
    relay.receive(hint(proto.HINT_DIR_ATTR, 2, ATTR_OUT)[:60])
    relay.receive(proto.pack_notify(proto.NOTIFY_INVAL_INODE, b"\1"))
    assert getattr_answer(relay, 4) is None
    listed(relay, 6, b"a")
    assert relay.absent(8, b"b")


def test_host_changes_drop_what_the_relay_knows_about_the_directory() -> None:
    relay = Relay()
    listed(relay, 2, b"a")
    relay.receive(proto.pack_notify(proto.NOTIFY_INVAL_ENTRY, proto.NOTIFY_INVAL_ENTRY_OUT.pack(DIR, 1, 0) + b"b\0"))
    assert not relay.absent(4, b"b")


def test_a_listing_older_than_a_notification_about_its_directory_is_refused() -> None:
    relay = Relay()
    assert relay.send(lookup(2, b"missing")) is None
    # The host created "late" after the server read the directory; its notification overtook the hint.
    relay.receive(proto.pack_notify(proto.NOTIFY_INVAL_ENTRY,
                                    proto.NOTIFY_INVAL_ENTRY_OUT.pack(DIR, 4, 0) + b"late\0"))
    relay.receive(hint(proto.HINT_DIR_NAMES, 2, names(b"a")))
    assert not relay.absent(4, b"late")


def test_an_attribute_change_of_the_directory_keeps_its_names_but_not_its_attributes() -> None:
    relay = Relay()
    relay.send(create(2, b"f"))
    relay.receive(hint(proto.HINT_DIR_ATTR, 2, ATTR_OUT))
    assert relay.send(lookup(4, b"missing")) is None
    attrs_only = proto.pack_notify(proto.NOTIFY_INVAL_INODE, proto.NOTIFY_INVAL_INODE_OUT.pack(DIR, -1, 0))
    relay.receive(attrs_only)  # e.g. the host made the directory just before the guest looked into it
    relay.receive(hint(proto.HINT_DIR_NAMES, 4, names(b"f")))
    assert relay.absent(6, b"other")
    assert getattr_answer(relay, 8) is None
    relay.receive(proto.pack_notify(proto.NOTIFY_INVAL_INODE, proto.NOTIFY_INVAL_INODE_OUT.pack(DIR, 0, 0)))
    assert not relay.absent(10, b"other")  # its data: the server lost track (inotify overflow)


def test_listings_expire_and_go_with_the_stream_and_the_node() -> None:
    relay = Relay()
    listed(relay, 2, b"a")
    relay.clock.now += 1.5
    assert not relay.absent(4, b"c")
    listed(relay, 6, b"a")
    relay.cache.clear()  # reconnected: the host may have changed meanwhile
    assert not relay.absent(8, b"c")
    relay.receive(hint(proto.HINT_DIR_NAMES, 6, names(b"a")))  # a reply cached before the reconnect
    assert not relay.absent(10, b"c")
    listed(relay, 12, b"a")
    relay.send(request(proto.FORGET, 14, DIR, struct.pack("<Q", 1)))
    assert not relay.absent(16, b"c")


def getattr_answer(relay: Relay, unique: int) -> bytes | None:
    return relay.send(request(proto.GETATTR, unique, DIR, struct.pack("<IIQ", 0, 0, 0)))


def test_a_directory_s_getattr_is_answered_from_the_attributes_after_the_last_change() -> None:
    relay = Relay()
    relay.send(create(2, b"f"))
    relay.receive(hint(proto.HINT_DIR_ATTR, 2, ATTR_OUT))
    assert getattr_answer(relay, 4) == proto.pack_reply(4, 0, ATTR_OUT)
    relay.clock.now += 0.75
    answer = getattr_answer(relay, 5)
    assert answer is not None and answer[16 + 12:] == ATTR_OUT[12:]
    assert struct.unpack_from("<QI", answer, 16) == (0, 250_000_000)  # the kernel keeps it 0.25 s, not 1 s
    relay.clock.now += 0.75
    assert getattr_answer(relay, 6) is None  # expired


def test_any_later_change_to_the_directory_voids_its_attributes() -> None:
    relay = Relay()
    relay.send(create(2, b"f"))
    relay.receive(hint(proto.HINT_DIR_ATTR, 2, ATTR_OUT))
    relay.send(request(proto.SETXATTR, 4, DIR, b"..."))  # changes its ctime
    assert getattr_answer(relay, 6) is None
    relay.send(create(8, b"g"))
    relay.send(request(proto.RENAME, 10, 3, struct.pack("<Q", DIR) + b"x\0y\0"))  # into it, still in flight
    relay.receive(hint(proto.HINT_DIR_ATTR, 8, ATTR_OUT))  # from before the rename
    assert getattr_answer(relay, 12) is None
