"""sqlite (WAL) store shared by every fcvm process on the host.

Every write runs in `BEGIN IMMEDIATE`, so concurrent writers serialize on the database lock instead of
racing; unique constraints make double allocation impossible even across processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from fcvm.core import paths
from fcvm.core.errors import FcvmError, NotFoundError
from fcvm.core.kinds import RowKind, VmStatus
from fcvm.core.proc import ProcessRef

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any  # typing costs the read commands (`fcvm ls`) 4 ms at start

SCHEMA_VERSION = 1
LIVE_STATUSES = (VmStatus.CREATING, VmStatus.RUNNING, VmStatus.STOPPING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('creating','running','stopping','exited')),
    health      TEXT NOT NULL DEFAULT 'unknown',
    kind        TEXT NOT NULL CHECK (kind IN ('vm','serve','clone')),
    pid         INTEGER,
    pid_start   INTEGER,
    serve_id    TEXT,
    network     TEXT NOT NULL DEFAULT '{}',
    ports       TEXT NOT NULL DEFAULT '[]',
    image       TEXT NOT NULL DEFAULT '',
    hypervisor  TEXT NOT NULL DEFAULT '',
    config      TEXT NOT NULL DEFAULT '{}',
    created     REAL NOT NULL,
    started     REAL,
    exited      REAL,
    exit_code   INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS vms_live_name ON vms(name) WHERE status != 'exited';
CREATE TABLE IF NOT EXISTS snapshots (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    vm_id       TEXT,
    path        TEXT NOT NULL,
    created     REAL NOT NULL,
    info        TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS allocations (
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    vm_id       TEXT NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX IF NOT EXISTS allocations_vm ON allocations(vm_id);
CREATE TABLE IF NOT EXISTS journal (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    owner       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    data        TEXT NOT NULL,
    created     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_owner ON journal(owner);
"""


class NameInUse(FcvmError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"the name {name!r} is already used by a running VM",
            hint=f"choose another --name or stop it with `fcvm stop {name}`",
        )


class AllocationExhausted(FcvmError):
    pass


class _Row:
    """A row as an object. The records are plain classes, not dataclasses: importing dataclasses would cost every
    `fcvm ls` about 8 ms, almost as much as the bare interpreter's start. A subclass annotates its table's columns
    and makes them its slots."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, row: Mapping[str, Any]) -> None:
        for column in self.__slots__:
            setattr(self, column, row[column])


class VmRecord(_Row):
    """A row of `vms`, its JSON columns decoded."""

    id: str
    name: str
    status: str
    health: str
    kind: str
    pid: int | None
    pid_start: int | None
    serve_id: str | None
    network: dict[str, Any]
    ports: list[dict[str, Any]]
    image: str
    hypervisor: str
    config: dict[str, Any]
    created: float
    started: float | None
    exited: float | None
    exit_code: int | None
    __slots__ = tuple(__annotations__)

    @property
    def process(self) -> ProcessRef | None:
        if self.pid is None or self.pid_start is None:
            return None
        return ProcessRef(self.pid, self.pid_start)

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    def is_stale(self) -> bool:
        """A live row whose owning process is gone (or whose pid now belongs to someone else)."""
        return self.live and owner_gone(self.pid, self.pid_start)

    def to_json(self) -> dict[str, Any]:
        """The row as `ls --json` and `inspect` show it: the agent's credential is shown as redacted."""
        data = {column: getattr(self, column) for column in self.__slots__}
        machine = self.config.get("machine")
        if isinstance(machine, dict) and machine.get("agent_credential"):
            data["config"] = {**self.config, "machine": {**machine, "agent_credential": "<redacted>"}}
        return data


def owner_gone(pid: int | None, pid_start: int | None) -> bool:
    """Whether the process that owns a row is gone: no owner, or its pid now names another process."""
    return pid is None or pid_start is None or not ProcessRef(pid, pid_start).alive()


class SnapshotRecord(_Row):
    """A row of `snapshots`, its JSON column decoded."""

    id: str
    name: str
    vm_id: str | None
    path: str
    created: float
    info: dict[str, Any]
    __slots__ = tuple(__annotations__)


class JournalEntry:
    """A row of `journal`, less its creation time."""

    __slots__ = ("data", "id", "kind", "owner")

    def __init__(self, entry_id: int, owner: str, kind: str, data: dict[str, Any]) -> None:
        self.id = entry_id
        self.owner = owner
        self.kind = kind
        self.data = data


def new_id() -> str:
    return os.urandom(6).hex()


class Store:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = os.fspath(path) if path else paths.state_db()
        paths.ensure_dir(os.path.dirname(self.path) or ".")
        # The store names every VM, its ports and its journal; sqlite gives its -wal and -shm files the
        # database file's mode, so one owner-only file keeps all three private.
        paths.make_private(self.path)
        for suffix in ("-wal", "-shm"):
            paths.keep_private(self.path + suffix)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._db.execute("PRAGMA synchronous = NORMAL")
        if not self._initialised():
            self._initialise()

    def _initialised(self) -> bool:
        return bool(self._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                    and self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION)

    def _initialise(self) -> None:
        """Switch a new store to WAL and create its schema, one process at a time: sqlite answers a second
        process's `journal_mode = WAL` with "database is locked" at once, without waiting on busy_timeout."""
        import fcntl

        lock_path = paths.make_private(self.path + ".init-lock")
        with open(lock_path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._initialised():
                return
            self._db.execute("PRAGMA journal_mode = WAL")
            with self.transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def execute_integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- VMs -------------------------------------------------------------------------------------

    def create_vm(
        self,
        name: str,
        *,
        kind: RowKind = RowKind.VM,
        image: str = "",
        hypervisor: str = "",
        config: dict[str, Any] | None = None,
        process: ProcessRef | None = None,
        serve_id: str | None = None,
        vm_id: str | None = None,
    ) -> VmRecord:
        vm_id = vm_id or new_id()
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO vms (id, name, status, kind, pid, pid_start, serve_id, image, hypervisor,"
                    " config, created) VALUES (?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        vm_id,
                        name,
                        kind,
                        process.pid if process else None,
                        process.start if process else None,
                        serve_id,
                        image,
                        hypervisor,
                        json.dumps(config or {}),
                        time.time(),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            if "name" in str(exc):
                raise NameInUse(name) from exc
            raise
        record = self.get_vm(vm_id)
        assert record is not None
        return record

    _JSON_FIELDS = frozenset({"network", "ports", "config"})
    _VM_FIELDS = frozenset(
        {"status", "health", "pid", "pid_start", "serve_id", "network", "ports", "image", "hypervisor",
         "config", "started", "exited", "exit_code"}
    )

    def update_vm(self, vm_id: str, **fields: Any) -> None:
        unknown = set(fields) - self._VM_FIELDS
        if unknown:
            raise ValueError(f"unknown VM fields {sorted(unknown)}")
        values = [json.dumps(v) if k in self._JSON_FIELDS else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE vms SET {assignments} WHERE id = ?", (*values, vm_id))


    def update_config(self, vm_id: str, **values: Any) -> None:
        """Set these keys of the VM's config in place, in one statement: keys another process sets meanwhile (the
        owner's timings, `fcvm stop`'s grace) are kept, which a read-modify-write of the whole column would lose."""
        expression = "config"
        for key in values:
            assert key.isidentifier(), key
            expression = f"json_set({expression}, '$.{key}', json(?))"
        with self.transaction() as db:
            db.execute(f"UPDATE vms SET config = {expression} WHERE id = ?",
                       (*(json.dumps(value) for value in values.values()), vm_id))

    @staticmethod
    def _vm(row: sqlite3.Row) -> VmRecord:
        data = dict(row)
        for key in ("network", "ports", "config"):
            data[key] = json.loads(data[key])
        return VmRecord(data)

    def get_vm(self, name_or_id: str) -> VmRecord | None:
        """By id, else the live VM of that name, else the newest exited one."""
        row = self._db.execute(
            "SELECT * FROM vms WHERE id = ? OR name = ?"
            " ORDER BY id = ? DESC, status != 'exited' DESC, created DESC LIMIT 1",
            (name_or_id, name_or_id, name_or_id),
        ).fetchone()
        return self._vm(row) if row else None

    def require_vm(self, name_or_id: str) -> VmRecord:
        record = self.get_vm(name_or_id)
        if record is None:
            raise NotFoundError(f"no VM named {name_or_id!r}", hint="see `fcvm ls -a`")
        return record

    def list_vms(self, *, include_exited: bool = False, kind: RowKind | None = None) -> list[VmRecord]:
        query = "SELECT * FROM vms"
        clauses: list[str] = []
        params: list[Any] = []
        if not include_exited:
            clauses.append("status != 'exited'")
        if kind:
            clauses.append("kind = ?")
            params.append(kind)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        return [self._vm(r) for r in self._db.execute(query + " ORDER BY created", params)]

    def live_vm_owners(self) -> list[tuple[str, str, int | None, int | None]]:
        """(id, status, pid, pid_start) of each live VM, oldest first: what the reaper looks at. Not whole rows:
        `fcvm ls` reaps before it lists, and decoding every row twice would cost it a millisecond per 100 VMs."""
        return [(row[0], row[1], row[2], row[3]) for row in self._db.execute(
            "SELECT id, status, pid, pid_start FROM vms WHERE status != 'exited' ORDER BY created")]

    def delete_vm(self, vm_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM allocations WHERE vm_id = ?", (vm_id,))
            db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    # --- allocations -----------------------------------------------------------------------------

    def allocate(self, kind: str, vm_id: str, candidates: Iterable[str]) -> str:
        """Take the first candidate nobody holds; atomic across processes."""
        with self.transaction() as db:
            taken = {r[0] for r in db.execute("SELECT value FROM allocations WHERE kind = ?", (kind,))}
            for value in candidates:
                if value not in taken:
                    db.execute(
                        "INSERT INTO allocations (kind, value, vm_id) VALUES (?, ?, ?)", (kind, value, vm_id)
                    )
                    return value
        raise AllocationExhausted(f"no free {kind} left: {len(taken)} in use", hint="run `fcvm gc`")


    def allocations(self, vm_id: str) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for kind, value in self._db.execute(
            "SELECT kind, value FROM allocations WHERE vm_id = ? ORDER BY kind, value", (vm_id,)
        ):
            result.setdefault(kind, []).append(value)
        return result

    def release_allocations(self, vm_id: str, kinds: Iterable[str] | None = None) -> None:
        """Release what `vm_id` holds: everything, or only allocations of `kinds`."""
        with self.transaction() as db:
            if kinds is None:
                db.execute("DELETE FROM allocations WHERE vm_id = ?", (vm_id,))
                return
            wanted = list(kinds)
            marks = ",".join("?" * len(wanted))
            db.execute(f"DELETE FROM allocations WHERE vm_id = ? AND kind IN ({marks})", (vm_id, *wanted))

    def claim_port(self, vm_id: str, protocol: str, addr: str, port: int) -> str | None:
        """Claim `protocol:addr:port` ("*" = every address). Returns the holder's vm id on a clash.

        A wildcard clashes with every address and vice versa, so the check and the insert share a transaction.
        """
        with self.transaction() as db:
            rows = db.execute(
                "SELECT value, vm_id FROM allocations WHERE kind = 'port' AND value LIKE ?",
                (f"{protocol}:%:{port}",),
            ).fetchall()
            for other, owner in rows:
                other_addr = other.split(":")[1]
                if addr == "*" or other_addr == "*" or other_addr == addr:
                    return str(owner)
            db.execute("INSERT INTO allocations (kind, value, vm_id) VALUES ('port', ?, ?)",
                       (f"{protocol}:{addr}:{port}", vm_id))
        return None

    def allocation_owners(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT vm_id FROM allocations")}

    # --- journal ---------------------------------------------------------------------------------

    def journal_add(self, owner: str, kind: str, data: dict[str, Any]) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO journal (owner, kind, data, created) VALUES (?, ?, ?, ?)",
                (owner, kind, json.dumps(data), time.time()),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def journal_remove(self, entry_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM journal WHERE id = ?", (entry_id,))

    def journal_entries(self, owner: str) -> list[JournalEntry]:
        """Newest first: the order in which to undo."""
        return [
            JournalEntry(r["id"], r["owner"], r["kind"], json.loads(r["data"]))
            for r in self._db.execute("SELECT * FROM journal WHERE owner = ? ORDER BY id DESC", (owner,))
        ]

    def journal_owners(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT owner FROM journal")}

    # --- snapshots -------------------------------------------------------------------------------

    def add_snapshot(self, name: str, path: str, *, vm_id: str | None, info: dict[str, Any]) -> SnapshotRecord:
        snap_id = new_id()
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO snapshots (id, name, vm_id, path, created, info) VALUES (?, ?, ?, ?, ?, ?)",
                    (snap_id, name, vm_id, path, time.time(), json.dumps(info)),
                )
        except sqlite3.IntegrityError as exc:
            raise FcvmError(f"a snapshot named {name!r} already exists", hint="fcvm snapshot rm it first") from exc
        record = self.get_snapshot(snap_id)
        assert record is not None
        return record

    def get_snapshot(self, name_or_id: str) -> SnapshotRecord | None:
        row = self._db.execute(
            "SELECT * FROM snapshots WHERE id = ? OR name = ?", (name_or_id, name_or_id)
        ).fetchone()
        if not row:
            return None
        data = dict(row)
        data["info"] = json.loads(data["info"])
        return SnapshotRecord(data)

    def update_snapshot_info(self, snapshot_id: str, info: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE snapshots SET info = ? WHERE id = ?", (json.dumps(info), snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def list_snapshots(self) -> list[SnapshotRecord]:
        rows = self._db.execute("SELECT id FROM snapshots ORDER BY created").fetchall()
        return [s for r in rows if (s := self.get_snapshot(r[0])) is not None]


