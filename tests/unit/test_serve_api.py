"""`fcvm serve` driven by the official E2B SDK, over a stand-in backend whose "machines" run their commands on the
host (in a directory of their own, with the same sh wrappers and file scripts the VMs get): the routing, both
API versions, auth, the Connect streams and the file transfers, without booting anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fcvm.serve import connect as c
from fcvm.serve.app import Server
from fcvm.serve.backend import Machine, NotSnapshottable, UnknownTemplate
from fcvm.serve.sandboxes import Sandboxes
from fcvm_wire import exec_proto as ep
from tests.support import require

e2b = pytest.importorskip("e2b", reason="the official e2b SDK is a dev dependency")
from e2b import Sandbox  # noqa: E402

API_KEY = "e2b_" + "0123456789abcdef" * 2
TEMPLATE = "local"
OLD_SDK = "2.45.1"  # creates through POST /sandboxes, before the SDK moved to /v2 (2.51)
Handler = Callable[..., Awaitable[object]]


@dataclass
class LocalMachine:
    name: str
    root: Path
    template: str
    snapshottable: bool = True
    vcpus: int = 1
    mem_mib: int = 256
    disk_mib: int = 0
    groups: set[int] = field(default_factory=set)


class LocalStream:
    """A host process as exec_proto frames; the exit frame comes when the process ends (orphans holding its
    pipes do not delay it, as the agent does not wait for them either)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.group = process.pid
        self._frames: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async def pump(reader: asyncio.StreamReader | None, kind: int) -> None:
            assert reader is not None
            while data := await reader.read(65536):
                await self._frames.put((kind, data))

        pumps = asyncio.gather(pump(self.process.stdout, ep.STDOUT), pump(self.process.stderr, ep.STDERR))
        code = await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pumps), 0.5)
        await self._frames.put((ep.EXIT, str(code if code >= 0 else 128 - code).encode()))
        await self._frames.put(None)

    async def frame(self) -> tuple[int, bytes] | None:
        item = await self._frames.get()
        if item is None:
            self._frames.put_nowait(None)
        return item

    async def send_stdin(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        await self.process.stdin.drain()

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def close(self) -> None:  # like a closed connection: the reader sees its end
        self._task.cancel()
        self._frames.put_nowait(None)


class LocalBackend:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.user_snapshots: dict[str, str] = {}
        self.taken: list[str] = []
        self.removed: list[str] = []
        self.started: list[str] = []
        self.running: list[LocalMachine] = []

    async def start(self, template: str, name: str) -> Machine:
        if template != TEMPLATE and template not in self.user_snapshots:
            raise UnknownTemplate(f"template {template!r} is neither a snapshot nor a local image")
        root = self.base / f"{name}-{len(self.started)}"
        root.mkdir()
        self.started.append(template)
        machine = LocalMachine(name, root, template)
        self.running.append(machine)
        return machine

    async def stop(self, machine: Machine) -> None:
        assert isinstance(machine, LocalMachine)
        await asyncio.sleep(0.3)  # a VM takes a while to go
        self.running.remove(machine)
        for group in machine.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)

    async def snapshot(self, machine: Machine, tag: str) -> None:
        if not machine.snapshottable:
            raise NotSnapshottable(f"{machine.name} cannot be snapshotted")
        self.user_snapshots[tag] = machine.name
        self.taken.append(tag)

    async def remove_snapshot(self, tag: str) -> bool:
        if any(m.template == tag for m in self.running):
            return False
        self.user_snapshots.pop(tag, None)
        self.removed.append(tag)
        return True

    def snapshots(self) -> set[str]:
        return set(self.user_snapshots)

    async def exec(self, machine: Machine, argv: list[str], env: dict[str, str], *, stdin: bool) -> LocalStream:
        assert isinstance(machine, LocalMachine)
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=machine.root, env={"PATH": os.environ["PATH"], "HOME": str(machine.root), **env},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        machine.groups.add(process.pid)
        return LocalStream(process)

    async def signal(self, machine: Machine, group: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)


@dataclass
class Running:
    url: str
    backend: LocalBackend
    sandboxes: Sandboxes
    seen: list[tuple[str, str]]  # (method, path) of every request


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Running]:
    """The server on a free port, the SDK pointed at it; `pool` (indirect parameter) machines started ahead."""
    from aiohttp import web

    backend = LocalBackend(tmp_path)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    seen: list[tuple[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append((request.method, request.path))
        return await handler(request)

    async def main() -> None:
        sandboxes = Sandboxes(backend, default_template=TEMPLATE, pool=getattr(request, "param", 0))
        app = Server(sandboxes, API_KEY).app()
        app.middlewares.append(record)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder.update(runner=runner, sandboxes=sandboxes, port=runner.addresses[0][1], stop=asyncio.Event())
        ready.set()
        await holder["stop"].wait()  # type: ignore[attr-defined]
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    url = f"http://127.0.0.1:{holder['port']}"
    for name, value in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", API_KEY)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    yield Running(url, backend, holder["sandboxes"], seen)  # type: ignore[arg-type]
    loop.call_soon_threadsafe(holder["stop"].set)  # type: ignore[attr-defined]
    thread.join(30)
    assert not backend.running  # every machine is stopped with the server


@pytest.fixture
def sandbox(server: Running) -> Iterator[Sandbox]:
    created = Sandbox.create(template=TEMPLATE, envs={"SANDBOX_LEVEL": "from-create"}, metadata={"who": "test"})
    yield created
    created.kill()


def wait_for(predicate: object, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


# --- commands -------------------------------------------------------------------------------------------

def test_commands_stdout_stderr_exit_env_cwd(server: Running, sandbox: Sandbox, tmp_path: Path) -> None:
    assert ("POST", "/v2/sandboxes") in server.seen  # this SDK creates through v2
    result = sandbox.commands.run("echo hello; echo oops >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "oops\n", 0)
    with pytest.raises(e2b.CommandExitException) as failed:
        sandbox.commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stdout == "partial\n"
    out = sandbox.commands.run('echo "$SANDBOX_LEVEL $PER_CALL"', envs={"PER_CALL": "from-run"}).stdout
    assert out == "from-create from-run\n"
    (tmp_path / "elsewhere").mkdir()
    assert sandbox.commands.run("pwd", cwd=str(tmp_path / "elsewhere")).stdout.strip() == str(tmp_path / "elsewhere")


def test_background_command_wait_connect_list_and_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 0.5; echo done", background=True)
    assert handle.pid > 0
    assert handle.wait().stdout == "done\n"
    sleeper = sandbox.commands.run("echo started; sleep 600", background=True)
    assert any(p.pid == sleeper.pid for p in sandbox.commands.list())
    attached = sandbox.commands.connect(sleeper.pid)
    assert sandbox.commands.kill(sleeper.pid) is True
    with pytest.raises(e2b.CommandExitException) as killed:
        attached.wait()
    assert killed.value.exit_code == 128 + signal.SIGKILL
    assert wait_for(lambda: all(p.pid != sleeper.pid for p in sandbox.commands.list()))
    assert sandbox.commands.kill(sleeper.pid) is False


def test_a_command_runs_as_the_user_named(sandbox: Sandbox) -> None:
    require(os.geteuid() == 0, "switching user needs root")
    assert sandbox.commands.run("id -un", user="nobody").stdout == "nobody\n"
    with pytest.raises(e2b.CommandExitException):
        sandbox.commands.run("id -un", user="no-such-user")
    with pytest.raises(e2b.InvalidArgumentException):
        sandbox.commands.run("true", user="bad user; rm")


def test_stdin_is_sent_and_closed(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "line one\n")
    handle.send_stdin(b"line two\n")
    handle.close_stdin()
    assert handle.wait().stdout == "line one\nline two\n"


def test_large_binary_output_arrives_whole(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' 'x'")
    assert len(result.stdout) == 3_000_000


def test_start_streams_keepalives_and_ends_at_its_deadline(server: Running, sandbox: Sandbox) -> None:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": sandbox._envd_access_token or "",
               "Content-Type": c.STREAM_CONTENT_TYPE, "Keepalive-Ping-Interval": "1"}

    def start(command: str, timeout_ms: str) -> list[tuple[int, dict[str, object]]]:
        body = c.envelope({"process": {"cmd": "/bin/sh", "args": ["-c", command]}, "stdin": False})
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.post("/process.Process/Start", content=body,
                                   headers={**headers, "Connect-Timeout-Ms": timeout_ms})
        assert response.status_code == 200 and response.headers["content-type"] == c.STREAM_CONTENT_TYPE
        return [(flags, json.loads(payload)) for flags, payload in c.split_envelopes(response.content)]

    messages = start("sleep 3; echo late", "60000")
    events = [next(iter(m["event"])) for flags, m in messages if not flags]  # type: ignore[call-overload]
    assert events[0] == "start" and "keepalive" in events and events[-2:] == ["data", "end"]
    assert messages[-1] == (c.FLAG_END_STREAM, {})
    flags, last = start("sleep 600", "300")[-1]
    assert flags == c.FLAG_END_STREAM and last["error"]["code"] == "deadline_exceeded"  # type: ignore[index]


# --- files ----------------------------------------------------------------------------------------------

def test_files_text_binary_and_metadata_calls(sandbox: Sandbox, tmp_path: Path) -> None:
    base = tmp_path / "files"
    text_path = f"{base}/deep/er/a.txt"
    info = sandbox.files.write(text_path, "hello files\n")
    assert info.path == text_path and info.name == "a.txt"
    assert sandbox.files.read(text_path) == "hello files\n"
    binary = bytes(range(256)) * 1000
    sandbox.files.write(f"{base}/b.bin", binary)
    assert bytes(sandbox.files.read(f"{base}/b.bin", format="bytes")) == binary
    sandbox.files.write(f"{base}/octet.bin", binary, use_octet_stream=True)
    sandbox.files.write(f"{base}/gzipped.bin", binary, gzip=True)
    for name in ("octet.bin", "gzipped.bin"):
        assert (base / name).read_bytes() == binary
    assert sandbox.files.exists(text_path) and not sandbox.files.exists(f"{base}/nope")
    assert sandbox.files.make_dir(f"{base}/made") is True
    assert sandbox.files.make_dir(f"{base}/made") is False
    entries = {e.name: e for e in sandbox.files.list(str(base))}
    assert set(entries) == {"deep", "b.bin", "octet.bin", "gzipped.bin", "made"}
    assert entries["b.bin"].size == len(binary) and entries["b.bin"].type == e2b.FileType.FILE
    assert entries["made"].type == e2b.FileType.DIR
    assert {e.name for e in sandbox.files.list(str(base), depth=3)} >= {"er", "a.txt"}
    moved = sandbox.files.rename(f"{base}/b.bin", f"{base}/made/c.bin")
    assert moved.path == f"{base}/made/c.bin" and not (base / "b.bin").exists()
    sandbox.files.remove(f"{base}/deep")
    assert not (base / "deep").exists()
    stat = sandbox.files.get_info(f"{base}/made/c.bin")
    assert stat.size == len(binary) and stat.permissions.startswith("-rw")


def test_missing_files_are_not_found(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(e2b.FileNotFoundException):
        sandbox.files.read(f"{tmp_path}/missing")
    with pytest.raises(e2b.FileNotFoundException):
        sandbox.files.list(f"{tmp_path}/missing")
    with pytest.raises(e2b.FileNotFoundException):
        sandbox.files.remove(f"{tmp_path}/missing")
    with pytest.raises(e2b.FileNotFoundException):
        sandbox.files.rename(f"{tmp_path}/missing", f"{tmp_path}/other")


def test_signed_file_urls(sandbox: Sandbox, tmp_path: Path, server: Running) -> None:
    path = f"{tmp_path}/signed.txt"
    with httpx.Client() as client:
        upload = sandbox.upload_url(path, use_signature_expiration=60)
        response = client.post(upload, files={"file": (path, b"signed")},
                               headers={"E2b-Sandbox-Id": sandbox.sandbox_id})
        assert response.status_code == 200, response.text
        download = sandbox.download_url(path)
        assert client.get(download, headers={"E2b-Sandbox-Id": sandbox.sandbox_id}).content == b"signed"
        forged = download.replace("signature=v1_", "signature=v1_x")
        assert client.get(forged, headers={"E2b-Sandbox-Id": sandbox.sandbox_id}).status_code == 401


# --- control plane ----------------------------------------------------------------------------------------

def test_info_list_timeout_and_kill(server: Running) -> None:
    first = Sandbox.create(template=TEMPLATE, metadata={"role": "a"})
    second = Sandbox.create(metadata={"role": "b"})  # the SDK's default template, "base"
    info = first.get_info()
    assert info.sandbox_id == first.sandbox_id and info.state == e2b.SandboxState.RUNNING
    assert info.metadata == {"role": "a"} and info.template_id == TEMPLATE
    listed = Sandbox.list(query=e2b.SandboxQuery(metadata={"role": "b"})).next_items()
    assert [s.sandbox_id for s in listed] == [second.sandbox_id]
    assert {s.sandbox_id for s in Sandbox.list().next_items()} == {first.sandbox_id, second.sandbox_id}
    first.set_timeout(1)
    assert wait_for(lambda: first.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()})
    with pytest.raises(e2b.SandboxNotFoundException):
        first.get_info()
    assert not first.is_running()
    assert second.is_running()
    assert second.kill() is True
    assert Sandbox.kill(second.sandbox_id) is False


def test_bad_input_gets_the_status_the_sdk_expects(server: Running, sandbox: Sandbox) -> None:
    with pytest.raises(e2b.AuthenticationException):
        Sandbox.create(template=TEMPLATE, api_key="e2b_" + "f" * 32)
    with pytest.raises(e2b.SandboxException, match="404: template 'no-such-template'"):
        Sandbox.create(template="no-such-template")
    with pytest.raises(e2b.SandboxNotFoundException):
        Sandbox.connect("a" * 20)
    with httpx.Client(base_url=server.url) as client:
        missing = client.get("/templates", headers={"X-API-KEY": API_KEY})
        assert missing.status_code == 501 and "GET /templates" in missing.json()["message"]
        rpc = client.post("/filesystem.Filesystem/WatchDir", headers={"E2b-Sandbox-Id": sandbox.sandbox_id,
                                                                       "X-Access-Token": sandbox._envd_access_token})
        assert rpc.status_code == 501 and rpc.json()["code"] == "unimplemented"
        headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "Content-Type": "application/json"}
        stolen = client.post("/process.Process/List", content=b"{}", headers={**headers, "X-Access-Token": "x"})
        assert stolen.status_code == 401
        assert client.post("/process.Process/List", content=b"{}", headers=headers).status_code == 401
        assert client.get("/files", params={"path": "/etc/hostname"}, headers=headers).status_code == 401
        other = client.get("/health", headers={"E2b-Sandbox-Id": "z" * 20})
        assert other.status_code == 502 and "was not found" in other.json()["message"]


def test_pause_connect_snapshot_and_fork(server: Running, sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox_id = sandbox.sandbox_id
    assert sandbox.pause() is True
    assert sandbox.pause() is False  # 409: already paused
    assert Sandbox.get_info(sandbox_id).state == e2b.SandboxState.PAUSED
    with pytest.raises(e2b.SandboxException):
        sandbox.commands.run("true")
    resumed = Sandbox.connect(sandbox_id)
    assert resumed.sandbox_id == sandbox_id
    assert resumed.commands.run("echo back").stdout == "back\n"
    pause_tag = server.backend.taken[-1]
    assert server.backend.started[-1] == pause_tag

    snapshot = resumed.create_snapshot(name="my-template")
    assert snapshot.snapshot_id == "my-template"
    assert [s.snapshot_id for s in Sandbox.list_snapshots().next_items()] == ["my-template"]
    from_snapshot = Sandbox.create(template="my-template")
    assert from_snapshot.commands.run("echo clone").stdout == "clone\n"
    from_snapshot.kill()

    forks = resumed.fork(count=3, timeout=120)
    ids = {f.sandbox_id for f in forks if isinstance(f, Sandbox)}
    assert len(ids) == 3 and sandbox_id not in ids
    for forked in forks:
        assert isinstance(forked, Sandbox)
        assert forked.commands.run("echo child").stdout == "child\n"
        forked.kill()
    assert resumed.commands.run("echo source").stdout == "source\n"
    assert Sandbox.delete_snapshot("my-template") is True
    assert Sandbox.delete_snapshot("my-template") is False
    assert pause_tag not in server.backend.removed  # the resumed machine runs on its memory
    assert resumed.kill() is True
    assert wait_for(lambda: pause_tag in server.backend.removed)  # the server's own snapshots go once unused
    assert not server.backend.user_snapshots


def test_a_command_streaming_when_its_sandbox_pauses_ends_with_an_error(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 600", background=True)
    assert sandbox.pause() is True
    with pytest.raises(e2b.SandboxNotRunningException):  # at once: not a plain deadline's TimeoutException
        handle.wait()


@pytest.mark.parametrize("server", [1], indirect=True)
def test_a_pool_hands_out_machines_started_ahead(server: Running) -> None:
    first = Sandbox.create(template=TEMPLATE)
    assert server.sandboxes.get(first.sandbox_id).machine.name == f"e2b-{first.sandbox_id}"  # type: ignore[union-attr]
    assert wait_for(lambda: len(server.backend.running) == 2)  # one more, started ahead
    second = Sandbox.create(template=TEMPLATE)
    machine = server.sandboxes.get(second.sandbox_id).machine
    assert machine is not None and machine.name.startswith("e2b-pool-")
    assert second.commands.run("echo pooled").stdout == "pooled\n"
    assert wait_for(lambda: len(server.backend.running) == 3)
    assert first.kill() and second.kill()


def test_a_sandbox_that_cannot_be_snapshotted_says_so(server: Running, sandbox: Sandbox) -> None:
    machine = server.sandboxes.get(sandbox.sandbox_id).machine
    assert machine is not None
    machine.snapshottable = False
    with pytest.raises(e2b.SandboxException, match="cannot be snapshotted"):
        sandbox.pause()
    assert sandbox.commands.run("echo still").stdout == "still\n"


def test_the_pre_v2_sdk(server: Running, tmp_path: Path) -> None:
    python = old_sdk_python()
    script = f"""
from e2b import Sandbox, CommandExitException, SandboxQuery
s = Sandbox.create(template={TEMPLATE!r}, envs={{"A": "1"}}, metadata={{"sdk": "old"}})
assert s.commands.run("echo $A").stdout == "1\\n"
try:
    s.commands.run("exit 7")
except CommandExitException as e:
    assert e.exit_code == 7
else:
    raise SystemExit("no CommandExitException")
handle = s.commands.run("cat", background=True, stdin=True)
s.commands.send_stdin(handle.pid, "piped")
s.commands.close_stdin(handle.pid)
assert handle.wait().stdout == "piped"
s.files.write("{tmp_path}/old/a.txt", "old sdk")
assert s.files.read("{tmp_path}/old/a.txt") == "old sdk" and s.files.exists("{tmp_path}/old/a.txt")
assert s.files.make_dir("{tmp_path}/old/d") and not s.files.make_dir("{tmp_path}/old/d")
s.files.rename("{tmp_path}/old/a.txt", "{tmp_path}/old/d/b.txt")
assert [e.name for e in s.files.list("{tmp_path}/old/d")] == ["b.txt"]
s.files.remove("{tmp_path}/old/d")
assert not s.files.exists("{tmp_path}/old/d")
listed = Sandbox.list(query=SandboxQuery(metadata={{"sdk": "old"}})).next_items()
assert [x.sandbox_id for x in listed] == [s.sandbox_id]
s.set_timeout(120)
assert s.get_info().metadata == {{"sdk": "old"}}
assert s.pause() and not s.pause()
s = Sandbox.connect(s.sandbox_id)
assert s.commands.run("echo again").stdout == "again\\n"
snapshot = s.create_snapshot(name="old-sdk-template")
assert Sandbox.create(template=snapshot.snapshot_id).kill()
forks = s.fork(count=2)
assert len(forks) == 2 and all(f.commands.run("echo f").stdout == "f\\n" and f.kill() for f in forks)
assert s.kill() and Sandbox.delete_snapshot("old-sdk-template")
print("ok")
"""
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.stdout.strip() == "ok", result.stderr
    assert ("POST", "/sandboxes") in server.seen
    assert any(path.startswith("/sandboxes/") and path.endswith("/connect") for _, path in server.seen)
    assert ("POST", "/v2/sandboxes") not in server.seen


def old_sdk_python() -> str:
    """A venv with the pre-/v2 SDK, made once and kept in the system temp dir."""
    venv = Path(os.environ.get("TMPDIR", "/tmp")) / f"fcvm-test-e2b-{OLD_SDK}"
    python = venv / "bin" / "python"
    probe = f"import importlib.metadata as m; assert m.version('e2b') == {OLD_SDK!r}"
    if not python.exists() or subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
        installed = subprocess.run([str(python), "-m", "pip", "install", "-q", f"e2b=={OLD_SDK}"],
                                   capture_output=True, text=True, timeout=600)
        require(installed.returncode == 0, f"cannot install e2b=={OLD_SDK}: {installed.stderr[-300:]}")
    return str(python)


def test_a_hostile_client_or_sandbox_gets_errors_not_the_server(server: Running, sandbox: Sandbox,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": sandbox._envd_access_token or ""}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        cut = client.post("/process.Process/Start", content=c.envelope({"process": {"cmd": "true"}})[:-2],
                          headers={**headers, "Content-Type": c.STREAM_CONTENT_TYPE})
        flags, last = c.split_envelopes(cut.content)[-1]
        assert flags == c.FLAG_END_STREAM and json.loads(last)["error"]["code"] == "invalid_argument"
        huge = client.post("/filesystem.Filesystem/Stat", content=b" " * (c.MAX_MESSAGE + 1),
                           headers={**headers, "Content-Type": "application/json"})
        assert huge.status_code == 429 and huge.json()["code"] == "resource_exhausted"

        # A sandbox whose shell floods stdout instead of reporting the command's pid.
        real_exec = server.backend.exec

        async def flooding(machine: Machine, argv: list[str], env: dict[str, str], *, stdin: bool) -> LocalStream:
            return await real_exec(machine, ["/bin/sh", "-c", "head -c 5000000 /dev/zero; sleep 600"], env,
                                   stdin=stdin)

        monkeypatch.setattr(server.backend, "exec", flooding)
        with pytest.raises(e2b.SandboxException, match="did not start"):
            sandbox.commands.run("echo hi")
