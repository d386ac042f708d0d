"""Guest text on the host user's terminal: shown, never obeyed.

What a container prints reaches the host user's terminal (`fcvm podman run` in the foreground, `fcvm logs`). A
terminal obeys control characters and escape sequences (ESC, CSI, OSC, DCS, ...): they can rewrite the screen,
set the window title, write to the clipboard, or worse on some terminals. So on a terminal every control character
but tab and newline (and the carriage return of a CRLF) is shown as its escape, `\\x1b` for ESC: the sequence's
text stays readable and nothing of it acts. Output that is not a terminal passes unchanged, as podman passes it.
"""

from __future__ import annotations

import codecs
import re

_KEPT = {"\t", "\n"}
# C0 controls, DEL and the C1 controls (U+0080..U+009F: 8-bit CSI, OSC, DCS, ST...).
_SHOWN = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(code) not in _KEPT}
_LONE_CR = re.compile(r"\r(?!\n)")


def neutralise(text: str) -> str:
    """`text` with every control character but tab, newline and a CRLF's CR shown as an escape."""
    return _LONE_CR.sub(r"\\x0d", text).translate({**_SHOWN, ord("\r"): "\r"})


class TerminalWriter:
    """Bytes from the guest, made safe for a terminal: decoded as UTF-8 across chunk boundaries (an invalid byte
    becomes U+FFFD) and neutralised."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text(self, chunk: bytes, final: bool = False) -> str:
        return neutralise(self._decoder.decode(chunk, final))
