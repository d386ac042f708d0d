"""What the guest relay knows about directories, to answer two requests without a round trip to the host.

Creating a file in a directory costs the guest kernel three round trips with the directory's lock held,
so creates in one directory queue behind each other: the directory's GETATTR (the previous create
invalidated its attributes and `default_permissions` needs its mode), a LOOKUP of the new name (negative)
and the CREATE. The server sends the relay two hints (private notifications, never written to /dev/fuse)
that let it answer the first two itself:

- DIR_ATTR (after each name operation: CREATE, MKNOD, MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME): the
  directory's attributes as they are right after the operation, i.e. NFS's post-operation attributes. The
  relay answers the directory's GETATTR with them until they expire (the attribute timeout).
- DIR_NAMES (with a negative LOOKUP): every name in the directory. The relay answers a LOOKUP of any other
  name with a negative entry, which the kernel keeps until the listing would expire (the negative timeout).

They stay true the way the kernel's own caches do: every host-side change to a directory reaches the
relay as a notification naming it (inotify, see fcvm.fusepipe.inval), which drops what the relay holds
for it, as does the kernel forgetting the node and every reconnect (the host may have changed meanwhile).
A request that could change a directory drops its attributes when it is sent; one that can create a name
adds the name when it is sent. A hint is taken only if nothing could have changed the directory between
the server reading it and the relay receiving it: the server handles a stream's requests in order, so
everything sent after the request a hint belongs to is still unanswered, and is looked at; and a
notification naming the directory that arrived after that request was sent refuses the hint (it may be
about a change the hint does not include).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable

from fcvm_wire.fusepipe import proto

_HDR = proto.IN_HEADER.size
_NODEID = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_NAME_MAX = 255
_NO_ATTR = (0,) * 16  # a negative entry's fuse_attr
_ATTR_VALID = struct.Struct("<QI")  # the head of a fuse_attr_out
_NOTIFY_SIZE = {proto.NOTIFY_INVAL_INODE: proto.NOTIFY_INVAL_INODE_OUT.size,
                proto.NOTIFY_INVAL_ENTRY: proto.NOTIFY_INVAL_ENTRY_OUT.size,
                proto.NOTIFY_DELETE: proto.NOTIFY_DELETE_OUT.size}
MAX_DIRS = 1024  # directories with attributes or names held; beyond, everything is dropped
MAX_NAMES = 1 << 16  # names held over all directories
MAX_NOTED = 1 << 14  # nodes remembered as recently notified; beyond, hints older than now are refused

# Where a name-creating request's new name starts (after its fixed-size body), and which directory it is in.
_NAME_AT = {proto.CREATE: 16, proto.MKNOD: 16, proto.MKDIR: 8, proto.SYMLINK: 0, proto.LINK: 8}


def created_names(opcode: int, nodeid: int, msg: bytes) -> list[tuple[int, bytes]]:
    """The (directory, name) pairs a request may create; empty for any other request."""
    body = msg[_HDR:]
    at = _NAME_AT.get(opcode)
    if at is not None:
        return [(nodeid, body[at:].split(b"\0", 1)[0])]
    if opcode in (proto.RENAME, proto.RENAME2):
        (newdir,) = _NODEID.unpack_from(body, 0)
        old, new, *_ = [*body[8 if opcode == proto.RENAME else 16:].split(b"\0"), b"", b""]
        return [(nodeid, old), (newdir, new)]  # RENAME_WHITEOUT leaves a node at the old name
    return []


def touched_dirs(opcode: int, nodeid: int, msg: bytes) -> tuple[int, ...]:
    """The nodes a request may change the attributes of (a directory's mtime, ctime, atime, link count)."""
    if opcode in (proto.RENAME, proto.RENAME2):
        return nodeid, _NODEID.unpack_from(msg, _HDR)[0]
    return (nodeid,)


# Requests that never change a node's attributes: they neither drop its attributes nor refuse a hint.
_NOT_CHANGING = frozenset({proto.LOOKUP, proto.GETATTR, proto.STATFS, proto.GETXATTR, proto.LISTXATTR,
                           proto.READLINK, proto.OPENDIR, proto.RELEASEDIR, proto.FSYNCDIR, proto.INTERRUPT,
                           proto.FORGET, proto.BATCH_FORGET, proto.ACCESS})


class DirCache:
    """The relay loop's alone (no lock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.attrs: dict[int, tuple[float, bytes]] = {}  # nodeid -> (expiry, fuse_attr_out)
        self.names: dict[int, tuple[float, set[bytes]]] = {}  # nodeid -> (expiry, every name it has)
        self.name_count = 0
        # nodeid -> the highest unique sent when a notification last named it: any notification (its attributes),
        # one about its entries (its names).
        self.noted: dict[int, int] = {}
        self.noted_names: dict[int, int] = {}
        self.floor = 0  # hints for requests up to this unique are refused (`noted` was cleared then)
        self.max_sent = 0

    def clear(self) -> None:
        """Forget everything (a new stream: the host may have changed meanwhile)."""
        self.attrs.clear()
        self.names.clear()
        self.name_count = 0
        self.noted.clear()
        self.noted_names.clear()
        self.floor = self.max_sent

    # ---- requests from the kernel ------------------------------------------------------------------------
    def answer(self, opcode: int, unique: int, nodeid: int, msg: bytes) -> bytes | None:
        """The reply to a LOOKUP or GETATTR if it is known here, else None."""
        if opcode == proto.GETATTR:
            held = self.attrs.get(nodeid)
            left = None if held is None else self._left(held[0])
            if held is None or left is None:
                self.attrs.pop(nodeid, None)
                return None
            # The kernel keeps them no longer than the hint is valid (fuse_attr_out: attr_valid, its nsec, dummy).
            return proto.pack_reply(unique, 0, _ATTR_VALID.pack(*left) + held[1][_ATTR_VALID.size:])
        if opcode == proto.LOOKUP:
            known = self.names.get(nodeid)
            left = None if known is None else self._left(known[0])
            if known is None or left is None:
                self._drop_names(nodeid)
                return None
            name = msg[_HDR:].split(b"\0", 1)[0]
            if name in known[1] or name in (b".", b"..") or len(name) > _NAME_MAX:  # the server's ENAMETOOLONG
                return None
            # A negative entry the kernel keeps while the listing is valid, as it keeps the server's: a host-side
            # create of the name invalidates both (FUSE_NOTIFY_INVAL_ENTRY).
            sec, nsec = left
            return proto.pack_reply(unique, 0, proto.ENTRY_OUT.pack(0, 0, sec, 0, nsec, 0, *_NO_ATTR))
        return None

    def _left(self, expiry: float) -> tuple[int, int] | None:
        """(seconds, nanoseconds) until `expiry`, or None once it has passed."""
        left = expiry - self.clock()
        return divmod(int(left * 1e9), 1_000_000_000) if left > 0 else None

    def sent(self, opcode: int, unique: int, nodeid: int, msg: bytes) -> None:
        """A request is going to the server."""
        self.max_sent = unique
        if not (self.attrs or self.names):
            return  # nothing to drop or add to: only the order of requests matters
        if opcode in _NOT_CHANGING:
            if opcode in (proto.FORGET, proto.BATCH_FORGET):
                for node in self._forgotten(opcode, nodeid, msg):
                    self.drop(node)
            return
        if self.attrs:
            for node in touched_dirs(opcode, nodeid, msg):
                self.attrs.pop(node, None)
        if self.names:
            for parent, name in created_names(opcode, nodeid, msg):
                known = self.names.get(parent)
                if known is not None and name not in known[1]:
                    known[1].add(name)
                    self.name_count += 1

    @staticmethod
    def _forgotten(opcode: int, nodeid: int, msg: bytes) -> Iterable[int]:
        if opcode == proto.FORGET:
            return (nodeid,)
        (count,) = _U32.unpack_from(msg, _HDR)
        count = min(count, (len(msg) - _HDR - 8) // 16)
        return (_NODEID.unpack_from(msg, _HDR + 8 + 16 * i)[0] for i in range(count))

    # ---- messages from the server -------------------------------------------------------------------------
    def notified(self, code: int, msg: bytes | memoryview) -> None:
        """A kernel notification on its way to /dev/fuse: what it names may have changed on the host. An entry
        notification (or a data one, as after lost inotify events) means its names; any, its attributes."""
        if len(msg) < proto.OUT_HEADER.size + _NOTIFY_SIZE.get(code, 0):
            return  # not one of ours, or truncated (the kernel refuses it too)
        if code == proto.NOTIFY_INVAL_INODE:
            node, offset, _ = proto.NOTIFY_INVAL_INODE_OUT.unpack_from(msg, proto.OUT_HEADER.size)
            names = offset >= 0
        elif code in (proto.NOTIFY_INVAL_ENTRY, proto.NOTIFY_DELETE):
            (node,) = _NODEID.unpack_from(msg, proto.OUT_HEADER.size)
            names = True
        else:
            return
        if len(self.noted) >= MAX_NOTED:
            self.noted.clear()
            self.noted_names.clear()
            self.floor = self.max_sent
        self.attrs.pop(node, None)
        self.noted[node] = self.max_sent
        if names:
            self._drop_names(node)
            self.noted_names[node] = self.max_sent

    def hint(self, code: int, msg: bytes | memoryview, in_flight: Iterable[tuple[int, bytes]]) -> None:
        """A DIR_ATTR or DIR_NAMES hint; `in_flight` is every (unique, request) still unanswered."""
        if len(msg) < proto.OUT_HEADER.size + proto.HINT_HEAD.size + (proto.ATTR_OUT.size
                                                                        if code == proto.HINT_DIR_ATTR else 0):
            return  # truncated: not from our server
        nodeid, unique, valid_ns = proto.HINT_HEAD.unpack_from(msg, proto.OUT_HEADER.size)
        body = bytes(msg[proto.OUT_HEADER.size + proto.HINT_HEAD.size:])
        noted = self.noted if code == proto.HINT_DIR_ATTR else self.noted_names
        if unique <= self.floor or noted.get(nodeid, 0) >= unique or not valid_ns:
            return
        later = [(u, m) for u, m in in_flight if u > unique]
        expiry = self.clock() + valid_ns / 1e9
        if code == proto.HINT_DIR_ATTR:
            for _, m in later:
                opcode, _, node = _REQUEST_HEAD.unpack_from(m, 4)
                if opcode not in _NOT_CHANGING and nodeid in touched_dirs(opcode, node, m):
                    return
            self._room()
            self.attrs[nodeid] = (expiry, body)
        elif code == proto.HINT_DIR_NAMES:
            names = set(body.split(b"\0")) - {b""}
            for _, m in later:
                opcode, _, node = _REQUEST_HEAD.unpack_from(m, 4)
                names.update(name for parent, name in created_names(opcode, node, m) if parent == nodeid)
            self._drop_names(nodeid)
            if self.name_count + len(names) > MAX_NAMES:
                return
            self._room()
            self.names[nodeid] = (expiry, names)
            self.name_count += len(names)

    def drop(self, nodeid: int) -> None:
        self.attrs.pop(nodeid, None)
        self._drop_names(nodeid)

    def _drop_names(self, nodeid: int) -> None:
        known = self.names.pop(nodeid, None)
        if known is not None:
            self.name_count -= len(known[1])

    def _room(self) -> None:
        if len(self.attrs) + len(self.names) >= MAX_DIRS:
            self.attrs.clear()
            self.names.clear()
            self.name_count = 0


_REQUEST_HEAD = struct.Struct("<IQQ")  # opcode, unique, nodeid (after the length)
