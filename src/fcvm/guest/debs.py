"""Debian packages as build inputs: resolve with apt-cache, fetch with `apt-get download`, keep them in
fcvm's cache so later builds work offline."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fcvm.core import log, paths, proc
from fcvm.core.errors import FcvmError

_log = log.get("guest")

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
HOST_APT_ARCHIVES = Path("/var/cache/apt/archives")


def deb_cache() -> Path:
    return paths.ensure_dir(paths.cache_dir() / "debs")


@dataclass(frozen=True)
class Candidate:
    name: str
    version: str
    arch: str
    size: int

    @property
    def filename(self) -> str:
        # apt names downloaded files with the epoch colon escaped.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _apt_fields(package: str) -> dict[str, str] | None:
    """The candidate version's control fields, from the local apt lists (no network)."""
    try:
        out = proc.run(["apt-cache", "show", "--no-all-versions", package], timeout=60, check=False)
    except FcvmError:
        return None
    if out.returncode != 0:
        return None
    fields: dict[str, str] = {}
    for line in out.stdout.decode(errors="replace").splitlines():
        if not line.strip():
            break
        if line[:1].isspace() or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields or None


APT_LISTS = Path("/var/lib/apt/lists")


def _lists_stamp() -> str:
    """Changes whenever `apt-get update` replaces an index file."""
    try:
        st = APT_LISTS.stat()
    except OSError:
        return ""
    return f"{st.st_mtime_ns}"


def _remembered(key: str, resolve: Callable[[], Candidate | None]) -> Candidate | None:
    """apt-cache takes about half a second per call here; remember answers until the apt lists change."""
    memo = paths.cache_dir() / "apt-candidates.json"
    stamp = _lists_stamp()
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or data.get("stamp") != stamp:
        data = {"stamp": stamp}
    entry = data.get(key)
    if isinstance(entry, dict):
        with contextlib.suppress(TypeError):
            return Candidate(**entry)
    found = resolve()
    if found is not None and stamp:
        data[key] = asdict(found)
        with contextlib.suppress(OSError):
            paths.ensure_dir(memo.parent)
            tmp = memo.with_name(f".{memo.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, memo)
    return found


def candidate(package: str) -> Candidate | None:
    return _remembered(package, lambda: _candidate(package))


def _candidate(package: str) -> Candidate | None:
    fields = _apt_fields(package)
    if not fields or "Version" not in fields:
        return None
    return Candidate(
        name=fields.get("Package", package),
        version=fields["Version"],
        arch=fields.get("Architecture", "amd64"),
        size=int(fields.get("Size", "0") or 0),
    )


def kernel_candidate() -> Candidate | None:
    """The versioned image package behind Debian's `linux-image-cloud-amd64` metapackage."""
    return _remembered(KERNEL_META_PACKAGE, _kernel_candidate)


def _kernel_candidate() -> Candidate | None:
    fields = _apt_fields(KERNEL_META_PACKAGE)
    if not fields:
        return None
    for alternative in fields.get("Depends", "").replace("|", ",").split(","):
        name = alternative.strip().split(" ", 1)[0]
        if name.startswith("linux-image-") and name != KERNEL_META_PACKAGE:
            return _candidate(name)
    return None


@contextlib.contextmanager
def watch_bytes(directory: Path, report: Callable[[int], None], interval: float = 0.5) -> Iterator[None]:
    """Call `report(total bytes of files under directory)` every `interval` seconds (download
    progress for tools that print none when not on a terminal)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            total = 0
            for root, _dirs, files in os.walk(directory):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, name)).st_size
            report(total)

    thread = threading.Thread(target=loop, name="watch-bytes", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _newest_cached(pattern: str) -> Path | None:
    found = [p for p in deb_cache().glob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def fetch(
    wanted: Candidate | None,
    *,
    fallback_glob: str,
    what: str,
    note: Callable[[str], None] = lambda _text: None,
) -> Path:
    """A .deb in fcvm's cache: `wanted` if cached (or in the host's apt archive), else downloaded;
    if that fails (offline) or apt knows no candidate, the newest cached file matching `fallback_glob`."""
    from fcvm.guest.assets import sweep_stale

    cache = deb_cache()
    sweep_stale(cache)
    if wanted is not None:
        target = cache / wanted.filename
        if target.exists():
            return target
        host_copy = HOST_APT_ARCHIVES / wanted.filename
        if host_copy.is_file():
            _link_or_copy(host_copy, target)
            return target
        spool = cache / f".download.tmp-{os.getpid()}"
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir()
        total_mb = wanted.size / 1e6

        def report(size: int) -> None:
            note(f"downloading {wanted.name} {size / 1e6:.0f}/{total_mb:.0f} MB")

        try:
            note(f"downloading {wanted.name}")
            with watch_bytes(spool, report):
                proc.run(["apt-get", "download", f"{wanted.name}={wanted.version}"], cwd=spool, timeout=900)
            got = spool / wanted.filename
            if not got.exists():
                debs = sorted(spool.glob("*.deb"))
                if len(debs) != 1:
                    raise FcvmError(f"apt-get download {wanted.name} produced no .deb")
                got = debs[0]
            os.replace(got, target)
            return target
        except FcvmError as exc:
            _log.warning("could not download %s: %s", wanted.name, exc)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
    cached = _newest_cached(fallback_glob)
    if cached is not None:
        _log.warning("using cached %s (offline, or apt has no candidate)", cached.name)
        return cached
    raise FcvmError(
        f"no {what} package: apt-get download failed and the cache ({cache}) has none",
        hint="check network access to the Debian mirror, or pass a local .deb",
    )


def fetch_kernel_deb(note: Callable[[str], None] = lambda _text: None) -> Path:
    return fetch(
        kernel_candidate(),
        fallback_glob="linux-image-*-cloud-amd64_*.deb",
        what="guest kernel (linux-image-cloud-amd64)",
        note=note,
    )


def fetch_busybox_deb(note: Callable[[str], None] = lambda _text: None) -> Path:
    return fetch(candidate(BUSYBOX_PACKAGE), fallback_glob="busybox-static_*.deb", what="busybox-static", note=note)


def extract(deb: Path, dest: Path) -> None:
    proc.run(["dpkg-deb", "-x", deb, dest], timeout=300)


def busybox_binary(note: Callable[[str], None] = lambda _text: None) -> Path:
    """The static busybox from Debian's busybox-static package, extracted once into the cache."""
    deb = fetch_busybox_deb(note)
    from fcvm.guest.assets import sha256_file

    out = paths.ensure_dir(paths.cache_dir() / "busybox") / f"busybox-{sha256_file(deb)[:16]}"
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extract(deb, tmp)
        binary = tmp / "bin" / "busybox"
        if not binary.exists():
            raise FcvmError(f"{deb.name} holds no bin/busybox")
        os.replace(binary, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
