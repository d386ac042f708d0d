"""--map: host directories in the container over fuse-pipe, on both hypervisors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fcvm.core.wait import wait_until
from tests.hoststate import HostState
from tests.vm.support import HYPERVISORS, RunVm, fcvm, get, hypervisor_env, published_url


@pytest.mark.parametrize("hypervisor", HYPERVISORS)
def test_mapped_directories_read_write_and_follow_host_changes(
    run_vm: RunVm, host_port: int, hypervisor: str, tmp_path: Path
) -> None:
    env = hypervisor_env(hypervisor)
    site, config = tmp_path / "site", tmp_path / "config"
    site.mkdir()
    config.mkdir()
    (site / "index.html").write_text("first version\n")
    (config / "app.conf").write_text("setting=1\n")
    before = HostState.capture()
    run_vm("-d", "--name", "vol", "--hypervisor", hypervisor, "-p", f"{host_port}:80", "--map", f"{site}:/www",
           "--map", f"{config}:/etc/app:ro", "localhost/fcvm-demo-httpd", env=env)
    url = published_url("vol", 80)
    assert get(url + "index.html") == "first version\n"
    # A host-side change reaches the container (inotify invalidation; tests/unit/test_fusepipe_inval.py
    # covers the mechanism).
    (site / "index.html").write_text("second version\n")
    wait_until(lambda: get(url + "index.html") == "second version\n", 30, interval=0.2)
    assert get(url + "index.html") == "second version\n"

    script = ("echo written-in-guest > /www/new.txt && mv /www/new.txt /www/renamed.txt && "
              "chmod 640 /www/renamed.txt && echo synced | dd of=/www/synced conv=fsync 2>/dev/null && "
              "cat /etc/app/app.conf")
    assert fcvm("exec", "vol", "--", "sh", "-c", script).stdout == "setting=1\n"
    assert (site / "renamed.txt").read_text() == "written-in-guest\n"
    assert not (site / "new.txt").exists()
    assert (site / "renamed.txt").stat().st_mode & 0o777 == 0o640
    assert (site / "synced").read_text() == "synced\n"

    refused = fcvm("exec", "vol", "--", "sh", "-c", "echo x > /etc/app/app.conf", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    assert (config / "app.conf").read_text() == "setting=1\n"
    fcvm("stop", "vol")
    assert HostState.capture().diff(before) == {}
    assert sorted(os.listdir(site)) == ["index.html", "renamed.txt", "synced"]
