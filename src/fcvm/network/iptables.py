"""iptables rules (through the `iptables` binary: no maintained Python binding exists) and the host-wide state
that all bridged VMs share: fcvm's own chains, their hooks, ip_forward.

Every per-VM rule lives in a dedicated FCVM-* chain and carries a `fcvm <key>` comment, so `iptables-save |
grep -i fcvm` shows everything fcvm ever added. The shared part is reference counted in RUN_DIR (under a
lock): the first bridged VM hooks the chains and enables forwarding, the last one restores what was there.

A VM's rules go in with one `iptables-restore --noflush`, and what a new VM must know of the host's rules (the
ports other VMs publish, whether fcvm's chains and hooks are in place) comes from one `iptables-save`: each
process costs ~4 ms, and a clone's start used to run ~18 of them.

The filter chains keep the host firewall in charge. FCVM-INPUT and FCVM-ISOLATION go first in INPUT and
FORWARD but only ever drop or reject a VM's traffic (spoofed sources, new connections to the host or to a VM
that did not come through a published port), or RETURN it to the host's rules. FCVM-ACCEPT, which accepts
exactly one VM's own traffic (so VMs work under a FORWARD policy of DROP), is appended: the host's own
FORWARD rules see every packet before it does. (Its name is new: an older fcvm hooked FCVM-FORWARD first in
FORWARD, and a hook that already exists is left where it is.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcvm.core import log, proc
from fcvm.core.errors import FcvmError
from fcvm.network import base

_log = log.get("network")


@dataclass(frozen=True)
class Hook:
    """fcvm's `chain` is jumped to from the built-in `builtin` of `table`: first, or after the host's rules."""

    table: str
    builtin: str
    chain: str
    first: bool = False


HOOKS = (
    Hook("nat", "PREROUTING", "FCVM-PREROUTING"),
    Hook("nat", "OUTPUT", "FCVM-OUTPUT"),
    Hook("nat", "POSTROUTING", "FCVM-POSTROUTING"),
    Hook("filter", "INPUT", "FCVM-INPUT", first=True),  # drops and rejects only
    Hook("filter", "FORWARD", "FCVM-ISOLATION", first=True),  # drops and rejects only
    Hook("filter", "FORWARD", "FCVM-ACCEPT"),  # accepts a VM's own traffic, after the host's rules
)
# How fcvm refuses a VM's new connection to what it may not reach: at once, and saying why (EHOSTUNREACH).
REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
Rule = tuple[str, str, Sequence[str]]  # (table, chain, its arguments after `-A CHAIN`)
_STATE = "net-host.json"
_LOCK = "net.lock"


def iptables(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return proc.run([base.tool("iptables"), "-w", "10", *args], timeout=30, check=check)


def comment(vm_id: str) -> list[str]:
    return ["-m", "comment", "--comment", f"fcvm {base.vm_key(vm_id)}"]


def exists(table: str, chain: str, rule: Sequence[str]) -> bool:
    """True if the rule is present; False if it or its chain is gone."""
    return iptables(["-t", table, "-C", chain, *rule], check=False).returncode == 0


def add_rules(journal: Any, rules: Sequence[Rule]) -> None:
    """Journal every rule, then append them all in the host's network namespace."""
    for table, chain, rule in rules:
        journal.record("iptables", table=table, chain=chain, rule=list(rule))
    restore(rules)


def delete_rule(table: str, chain: str, rule: Sequence[str]) -> None:
    """Delete one copy of the rule; nothing to do if it (or its chain) is already gone."""
    if not exists(table, chain, rule):
        return
    result = iptables(["-t", table, "-D", chain, *rule], check=False)
    if result.returncode != 0 and exists(table, chain, rule):
        raise FcvmError(f"could not delete iptables rule -t {table} {chain} {' '.join(rule)}: "
                        + result.stderr.decode(errors="replace").strip())


def chain_rules(table: str, chain: str) -> list[list[str]]:
    """Rules of `chain` as `iptables -S` argument lists (without `-A CHAIN`); [] if the chain does not exist."""
    result = iptables(["-t", table, "-S", chain], check=False)
    if result.returncode != 0:
        return []
    rules = []
    for line in result.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == "-A":
            rules.append(parts[2:])
    return rules


def restore(rules: Sequence[Rule]) -> None:
    """Append `rules` with one `iptables-restore --noflush`: each table's rules go in whole or not at all."""
    tables: dict[str, list[str]] = {}
    for table, chain, rule in rules:
        tables.setdefault(table, []).append(" ".join(["-A", chain, *(_restore_quote(a) for a in rule)]))
    text = "".join(f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
                   for table, lines in tables.items())
    proc.run([base.tool("iptables-restore"), "--noflush", "-w", "10"], input=text.encode(), timeout=30)


def _restore_quote(arg: str) -> str:
    """iptables-restore splits its lines on blanks and knows double quotes only (a comment holds a blank)."""
    if '"' in arg or "\n" in arg:
        raise ValueError(f"cannot pass {arg!r} to iptables-restore")
    return f'"{arg}"' if not arg or any(c.isspace() for c in arg) else arg


@dataclass(frozen=True)
class Ruleset:
    """The host's rules as `iptables-save` printed them: per table, its chains and each chain's rules."""

    tables: dict[str, dict[str, list[list[str]]]]

    @classmethod
    def read(cls) -> Ruleset:
        return cls.parse(proc.run([base.tool("iptables-save")], timeout=30).stdout.decode())

    @classmethod
    def parse(cls, saved: str) -> Ruleset:
        tables: dict[str, dict[str, list[list[str]]]] = {}
        chains: dict[str, list[list[str]]] = {}
        for line in saved.splitlines():
            if line.startswith("*"):
                chains = tables.setdefault(line[1:].strip(), {})
            elif line.startswith(":"):
                chains.setdefault(line[1:].split()[0], [])
            elif line.startswith("-A "):
                parts = shlex.split(line)
                chains.setdefault(parts[1], []).append(parts[2:])
        return cls(tables)

    def has_chain(self, table: str, chain: str) -> bool:
        return chain in self.tables.get(table, {})

    def rules(self, table: str, chain: str) -> list[list[str]]:
        return self.tables.get(table, {}).get(chain, [])

    def published_ports(self, protocol: str) -> set[int]:
        """Host ports some fcvm VM (of any state store) already DNATs."""
        ports: set[int] = set()
        for chain in ("FCVM-PREROUTING", "FCVM-OUTPUT"):
            for rule in self.rules("nat", chain):
                if "-p" in rule and rule[rule.index("-p") + 1] == protocol and "--dport" in rule:
                    ports.add(int(rule[rule.index("--dport") + 1]))
        return ports

    def hooked(self) -> bool:
        """Every fcvm chain exists and is jumped to from its built-in chain."""
        return all(self.has_chain(h.table, h.chain) and ["-j", h.chain] in self.rules(h.table, h.builtin)
                   for h in HOOKS)


# --- host-wide shared state -------------------------------------------------------------------------


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Serializes every fcvm process on the host that touches the shared network state."""
    base.RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(base.RUN_DIR / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _state_path() -> Path:
    return base.RUN_DIR / _STATE


def _load() -> dict[str, Any] | None:
    try:
        return dict(json.loads(_state_path().read_text()))
    except FileNotFoundError:
        return None


def _save(state: dict[str, Any]) -> None:
    tmp = _state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(_state_path())


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str:
    return _sysctl_path(name).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value + "\n")


def _forwarding_sysctls() -> dict[str, str]:
    """Everything writing ip_forward changes: the per-device forwarding flags and all.accept_redirects."""
    values = {"net.ipv4.ip_forward": read_sysctl("net.ipv4.ip_forward")}
    for conf in sorted(Path("/proc/sys/net/ipv4/conf").iterdir()):
        if "." in conf.name:
            continue
        with contextlib.suppress(OSError):
            values[f"net.ipv4.conf.{conf.name}.forwarding"] = (conf / "forwarding").read_text().strip()
    values["net.ipv4.conf.all.accept_redirects"] = read_sysctl("net.ipv4.conf.all.accept_redirects")
    return values


def _nft_tables() -> list[str] | None:
    """["ip nat", ...] when iptables is the nf_tables variant and `nft` is installed, else None."""
    if shutil.which("nft") is None:
        return None
    version = iptables(["--version"], check=False).stdout.decode()
    if "nf_tables" not in version:
        return None
    result = proc.run(["nft", "list", "tables"], check=False)
    if result.returncode != 0:
        return None
    return [line[len("table "):].strip() for line in result.stdout.decode().splitlines() if line.startswith("table ")]


def _ensure_chains() -> None:
    for hook in HOOKS:
        if iptables(["-t", hook.table, "-S", hook.chain], check=False).returncode != 0:
            iptables(["-t", hook.table, "-N", hook.chain])
        jump = ["-j", hook.chain]
        if not exists(hook.table, hook.builtin, jump):
            where = ["-I", hook.builtin, "1"] if hook.first else ["-A", hook.builtin]
            iptables(["-t", hook.table, *where, *jump])


def _remove_chains() -> None:
    for hook in HOOKS:
        leftovers = chain_rules(hook.table, hook.chain)
        if leftovers:
            _log.warning("leaving %s/%s in place: it still holds %d rule(s)", hook.table, hook.chain, len(leftovers))
            continue
        delete_rule(hook.table, hook.builtin, ["-j", hook.chain])
        iptables(["-t", hook.table, "-X", hook.chain], check=False)


def _table_is_empty(family_table: str) -> bool:
    family, table = family_table.split()
    result = proc.run(["nft", "-j", "list", "table", family, table], check=False)
    if result.returncode != 0:
        return False
    items = json.loads(result.stdout).get("nftables", [])
    for item in items:
        if "rule" in item or "set" in item or "map" in item:
            return False
        chain = item.get("chain")
        if chain is not None and (chain.get("hook") is None or chain.get("policy", "accept") != "accept"):
            return False
    return True


def acquire_host(journal: Any, vm_id: str, ruleset: Ruleset) -> None:
    """Make the shared chains and ip_forward ready for one more VM. Call with host_lock() held; `ruleset` is
    the host's rules read under it (the chains are checked there, and only made when one is missing)."""
    journal.record("net_host", vm_id=vm_id)
    state = _load()
    if state is None:  # the first user: note what the host looked like (kept until the last user leaves)
        state = {"users": [], "tables_before": _nft_tables(), "sysctls": _forwarding_sysctls()}
        _save(state)
    if not ruleset.hooked():
        _ensure_chains()
    if read_sysctl("net.ipv4.ip_forward") != "1":
        write_sysctl("net.ipv4.ip_forward", "1")
    if vm_id not in state["users"]:
        state["users"].append(vm_id)
    _save(state)


def release_host(vm_id: str) -> None:
    """Undo acquire_host for `vm_id`; the last user restores the host as it was before the first."""
    with host_lock():
        state = _load()
        if state is None:
            return
        users = [u for u in state.get("users", []) if u != vm_id]
        if users:
            state["users"] = users
            _save(state)
            return
        _remove_chains()
        saved: dict[str, str] = state.get("sysctls", {})
        # ip_forward first: writing it resets the per-device flags, which are then put back one by one.
        if "net.ipv4.ip_forward" in saved and read_sysctl("net.ipv4.ip_forward") != saved["net.ipv4.ip_forward"]:
            write_sysctl("net.ipv4.ip_forward", saved["net.ipv4.ip_forward"])
        for name, value in saved.items():
            with contextlib.suppress(FileNotFoundError):
                if read_sysctl(name) != value:
                    write_sysctl(name, value)
        before = state.get("tables_before")
        if before is not None:
            for table in _nft_tables() or []:
                if table not in before and table in ("ip nat", "ip filter") and _table_is_empty(table):
                    proc.run(["nft", "delete", "table", *table.split()], check=False)
        _state_path().unlink(missing_ok=True)
