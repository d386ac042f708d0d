from __future__ import annotations

import io
import logging

import pytest

from fcvm.core import log


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_in_a_pipe_coloured_on_a_tty() -> None:
    pipe, tty = io.StringIO(), _Tty()
    log.setup("info", stream=pipe)
    log.get("vm.web").info("booted")
    log.setup("info", stream=tty)
    log.get("vm.web").info("booted")
    assert pipe.getvalue() == "   info vm.web booted\n"
    assert "\x1b[" in tty.getvalue() and "vm.web" in tty.getvalue()


def test_fcvm_log_env_sets_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setenv("FCVM_LOG", "debug")
    log.setup(stream=out)
    log.get("uffd").debug("detail")
    assert "debug uffd detail" in out.getvalue()
    monkeypatch.setenv("FCVM_LOG", "warning")
    log.setup(stream=out)
    log.get("uffd").info("hidden")
    assert "hidden" not in out.getvalue()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2026-11-26T18:00:00.123456789 [anonymous-instance:main] Running Firecracker v1.16.1",
         "Running Firecracker v1.16.1"),
        ("2026-11-26T18:00:00.1 [web:fc_api] INFO API server started.", "API server started."),
        ("[anonymous-instance:fc_vcpu 0] Received KVM_EXIT_SHUTDOWN", "Received KVM_EXIT_SHUTDOWN"),
        ("[    0.280414] PCI: Fatal: No config space", "[    0.280414] PCI: Fatal: No config space"),
    ],
)
def test_firecracker_prefixes_are_stripped_and_console_lines_kept(line: str, message: str) -> None:
    assert log.strip_vmm_prefix(line) == message


def test_child_output_is_relogged_per_line_under_the_vm_name() -> None:
    out, sink = io.StringIO(), io.StringIO()
    log.setup("debug", stream=out)
    log.relog_lines([b"first\n", b"\n", b"second\r\n"], log.get("vm.db"), level=logging.INFO, sink=sink)
    assert out.getvalue().splitlines() == ["   info vm.db first", "   info vm.db second"]
    assert sink.getvalue() == "first\nsecond\n"
