"""fc-mock's snapshot file (`snapshot_path`): one JSON header line, then QEMU's device-state stream.

Firecracker's snapshot file carries the microVM's configuration with its state, so `PUT /snapshot/load` in a
fresh process rebuilds the same machine from it alone. fc-mock's does the same for its QEMU, which loads a
device-state stream only into the same devices in the same order (`-incoming defer`): the header holds the
Firecracker configuration the machine was built from (machine-config, drives in QEMU's device order with
their paths and read-only flags, the network interface and its TAP, the vsock CID and socket, the MMDS
configuration) and the QEMU version that wrote the stream. A load hands QEMU the file positioned past the
header. The guest RAM is not in it: `mem_file_path` is a reflink of the shared RAM file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcvm_standins.fc_mock.spec import Spec

FORMAT = "fc-mock-snapshot"
FORMAT_VERSION = 1
MAX_HEADER = 1 << 20  # the configuration is a few KiB; a longer first line is not a header


class SnapshotFileError(Exception):
    pass


def qemu_order(drives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The root drive first (it is /dev/vda, as under Firecracker), the others as configured."""
    return sorted(drives, key=lambda d: not d["is_root_device"])


@dataclass(frozen=True)
class SnapshotHeader:
    firecracker_version: str  # fc-mock's spec version: the snapshot format is tied to Firecracker's minor version
    qemu_version: str  # the QEMU that wrote the stream; another one cannot load it
    vm: dict[str, Any]  # the configuration, as GET /vm/config shows it (FullVmConfiguration, no logger/metrics)

    def line(self) -> bytes:
        """The header as written before the stream: one line of JSON."""
        record = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "firecracker_version": self.firecracker_version, "qemu_version": self.qemu_version, "vm": self.vm}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def read(cls, path: Path, spec: Spec) -> tuple[SnapshotHeader, int]:
        """(header, offset of the stream). The configuration is checked against the official spec."""
        try:
            with path.open("rb") as f:
                line = f.readline(MAX_HEADER)
        except OSError as exc:
            raise SnapshotFileError(f"cannot open the snapshot file {path}: {exc.strerror}") from None
        if not line.endswith(b"\n"):
            raise SnapshotFileError(f"{path} is not an fc-mock snapshot file (no header line)")
        try:
            record = json.loads(line)
        except ValueError:
            raise SnapshotFileError(f"{path} is not an fc-mock snapshot file (the header is not JSON)") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise SnapshotFileError(f"{path} is not an fc-mock snapshot file")
        if record.get("format_version") != FORMAT_VERSION:
            raise SnapshotFileError(f"{path} has snapshot format {record.get('format_version')}, and this fc-mock "
                                    f"reads {FORMAT_VERSION}")
        vm, versions = record.get("vm"), (record.get("firecracker_version"), record.get("qemu_version"))
        if not isinstance(vm, dict) or not all(isinstance(v, str) for v in versions):
            raise SnapshotFileError(f"{path}: the snapshot header is incomplete")
        problems = spec.errors("FullVmConfiguration", vm)
        if problems or "boot-source" not in vm or "machine-config" not in vm:
            raise SnapshotFileError(f"{path}: the snapshot's configuration is damaged: "
                                    + ("; ".join(problems) or "no boot-source or machine-config"))
        return cls(str(versions[0]), str(versions[1]), vm), len(line)
