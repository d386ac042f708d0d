"""`fcvm serve` against real microVMs, driven by the official E2B SDK as a user would: templates from a snapshot
and from an image, commands and files, time to live, pause and resume under the same id, snapshots as templates,
fork. One server (and one template snapshot) serves the module; every sandbox is gone when it stops."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.core import paths
from fcvm.core.wait import wait_until
from tests.unit.test_serve_api import old_sdk_python
from tests.vm.conftest import free_port

e2b = pytest.importorskip("e2b", reason="the official e2b SDK is a dev dependency")
from e2b import CommandExitException, Sandbox  # noqa: E402

TEMPLATE = "serve-tpl"
IMAGE = "localhost/fcvm-busybox"
_SDK_ENV = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")


class Served:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "FCVM_DATA_DIR": str(data_dir)}
        self.key = "e2b_" + os.urandom(20).hex()
        self.port = free_port()
        self.log = data_dir / "serve.log"
        self.process: subprocess.Popen[str] | None = None

    def fcvm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True,
                                timeout=600, check=False, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"fcvm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def start(self) -> str:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fcvm", "serve", "--listen", f"127.0.0.1:{self.port}"],
                env={**self.env, "FCVM_API_KEY": self.key}, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        url = f"http://127.0.0.1:{self.port}"
        assert line.strip() == f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY=$FCVM_API_KEY", line
        return url

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=300)

    def live_vms(self) -> list[str]:
        return [str(r["name"]) for r in json.loads(self.fcvm("ls", "--json").stdout)]

    def snapshot_tags(self) -> list[str]:
        return [s["name"] for s in json.loads(self.fcvm("snapshot", "ls", "--json").stdout)["snapshots"]
                if s["kind"] == "user"]


@pytest.fixture(scope="module")
def served(guest_assets: None) -> Iterator[Served]:
    data_dir = Path(tempfile.mkdtemp(prefix="t-serve-", dir=paths.data_dir() / "test-data"))
    served = Served(data_dir)
    saved = {name: os.environ.get(name) for name in _SDK_ENV}
    try:
        # The template: a running busybox VM with a file of its own, snapshotted, then stopped.
        served.fcvm("podman", "run", "-d", "--no-snapshot", "--name", "tpl-src", IMAGE, "sleep", "1000000")
        served.fcvm("exec", "tpl-src", "--", "sh", "-c", "echo from-template > /root/template.txt")
        served.fcvm("snapshot", "create", "tpl-src", "--tag", TEMPLATE)
        served.fcvm("stop", "tpl-src")
        url = served.start()
        os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=served.key)
        yield served
        assert served.stop() == 0, served.log.read_text()[-2000:]
        # Every sandbox is gone, and so is every snapshot the server took for itself.
        assert served.live_vms() == []
        assert served.snapshot_tags() == [TEMPLATE]
    finally:
        if served.process is not None and served.process.poll() is None:
            served.process.kill()
        for name in served.live_vms():
            served.fcvm("stop", name, check=False)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(data_dir, ignore_errors=True)


def test_commands_and_files_in_a_sandbox_from_a_snapshot(served: Served) -> None:
    sandbox = Sandbox.create(template=TEMPLATE, envs={"GREETING": "hello"}, metadata={"test": "basic"})
    try:
        assert sandbox.files.read("/root/template.txt") == "from-template\n"
        result = sandbox.commands.run("echo out; echo err >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
        with pytest.raises(CommandExitException) as failed:
            sandbox.commands.run("echo before; exit 7")
        assert failed.value.exit_code == 7 and failed.value.stdout == "before\n"
        assert sandbox.commands.run('echo "$GREETING $WHO"', envs={"WHO": "world"}).stdout == "hello world\n"
        assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
        assert sandbox.commands.run("id -u", user="nobody").stdout == "65534\n"
        background = sandbox.commands.run("sleep 1; echo finished", background=True)
        assert background.wait().stdout == "finished\n"
        sleeper = sandbox.commands.run("sleep 600", background=True)
        assert sandbox.commands.kill(sleeper.pid)
        with pytest.raises(CommandExitException):
            sleeper.wait()

        sandbox.files.write("/root/dir/text.txt", "some text\n")
        assert sandbox.files.read("/root/dir/text.txt") == "some text\n"
        binary = bytes(range(256)) * 512
        sandbox.files.write("/root/dir/data.bin", binary)
        assert bytes(sandbox.files.read("/root/dir/data.bin", format="bytes")) == binary
        assert sandbox.commands.run("cat /root/dir/text.txt").stdout == "some text\n"
        assert sandbox.files.exists("/root/dir/data.bin") and not sandbox.files.exists("/root/nothing")
        assert sandbox.files.make_dir("/root/dir/sub") is True
        assert sandbox.files.make_dir("/root/dir/sub") is False
        entries = {e.name: e for e in sandbox.files.list("/root/dir")}
        assert set(entries) == {"text.txt", "data.bin", "sub"}
        assert entries["data.bin"].size == len(binary) and entries["sub"].type == e2b.FileType.DIR
        renamed = sandbox.files.rename("/root/dir/text.txt", "/root/dir/sub/moved.txt")
        assert renamed.path == "/root/dir/sub/moved.txt"
        assert sandbox.files.read("/root/dir/sub/moved.txt") == "some text\n"
        sandbox.files.remove("/root/dir/sub")
        assert not sandbox.files.exists("/root/dir/sub/moved.txt")
        with pytest.raises(e2b.FileNotFoundException):
            sandbox.files.read("/root/dir/text.txt")

        listed = Sandbox.list(query=e2b.SandboxQuery(metadata={"test": "basic"})).next_items()
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
        assert f"e2b-{sandbox.sandbox_id}" in served.live_vms()
    finally:
        assert sandbox.kill() is True
    assert sandbox.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()}
    assert wait_until(lambda: f"e2b-{sandbox.sandbox_id}" not in served.live_vms(), 120, interval=1)


def test_a_sandbox_from_an_image_ends_when_its_time_is_up(served: Served) -> None:
    sandbox = Sandbox.create(template=IMAGE)
    assert sandbox.commands.run("cat /etc/os-release 2>/dev/null; echo up").stdout.endswith("up\n")
    assert sandbox.get_info().state == e2b.SandboxState.RUNNING
    sandbox.set_timeout(3)
    assert wait_until(lambda: not sandbox.is_running(), 120, interval=1)
    with pytest.raises(e2b.SandboxNotFoundException):
        sandbox.get_info()
    assert wait_until(lambda: f"e2b-{sandbox.sandbox_id}" not in served.live_vms(), 120, interval=1)


def test_pause_resume_snapshot_and_fork(served: Served) -> None:
    sandbox = Sandbox.create(template=TEMPLATE)
    sandbox_id = sandbox.sandbox_id
    extra: list[Sandbox] = []
    try:
        sandbox.files.write("/root/before-pause.txt", "still here")
        assert sandbox.pause() is True
        assert sandbox.pause() is False  # 409: already paused
        assert Sandbox.get_info(sandbox_id).state == e2b.SandboxState.PAUSED
        resumed = Sandbox.connect(sandbox_id)
        assert resumed.sandbox_id == sandbox_id
        assert resumed.files.read("/root/before-pause.txt") == "still here"
        assert resumed.commands.run("echo awake").stdout == "awake\n"

        resumed.files.write("/root/in-snapshot.txt", "snapshotted")
        snapshot = resumed.create_snapshot(name="serve-made")
        assert "serve-made" in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
        from_snapshot = Sandbox.create(template=snapshot.snapshot_id)
        extra.append(from_snapshot)
        assert from_snapshot.files.read("/root/in-snapshot.txt") == "snapshotted"

        forks = resumed.fork(count=3, timeout=300)
        children = [f for f in forks if isinstance(f, Sandbox)]
        extra.extend(children)
        assert len(children) == 3, forks
        assert len({c.sandbox_id for c in children} | {sandbox_id}) == 4
        for child in children:
            child.files.write("/root/mine.txt", child.sandbox_id)
        for child in children:
            assert child.files.read("/root/mine.txt") == child.sandbox_id
            assert child.files.read("/root/before-pause.txt") == "still here"
        assert not resumed.files.exists("/root/mine.txt")
        assert resumed.commands.run("echo source").stdout == "source\n"
    finally:
        for other in extra:
            other.kill()
        Sandbox.kill(sandbox_id)
    assert Sandbox.delete_snapshot("serve-made") is True


def test_bad_input_gets_the_statuses_the_sdk_expects(served: Served) -> None:
    with pytest.raises(e2b.AuthenticationException):
        Sandbox.list(api_key="e2b_" + "0" * 40).next_items()
    with pytest.raises(e2b.SandboxNotFoundException):
        Sandbox.connect("0" * 20)
    assert Sandbox.kill("0" * 20) is False
    with pytest.raises(e2b.SandboxException, match="404"):
        Sandbox.create(template="no-such-template-or-image")


def test_the_pre_v2_sdk_on_a_real_vm(served: Served) -> None:
    script = f"""
from e2b import Sandbox
s = Sandbox.create(template={TEMPLATE!r})
assert s.commands.run("cat /root/template.txt").stdout == "from-template\\n"
s.files.write("/tmp/old.bin", bytes(range(256)))
assert bytes(s.files.read("/tmp/old.bin", format="bytes")) == bytes(range(256))
assert s.kill()
print("ok")
"""
    started = time.monotonic()
    result = subprocess.run([old_sdk_python(), "-c", script], capture_output=True, text=True, timeout=600,
                            env=os.environ)
    assert result.stdout.strip() == "ok", (result.stderr, time.monotonic() - started)
