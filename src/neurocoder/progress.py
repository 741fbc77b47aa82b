"""A small progress bar: drawn on a terminal, silent otherwise (logs stay clean)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, enabled: bool | None = None) -> None:
        self.total, self.label, self.count = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self.suffix = ""

    def update(self, n: int = 1, suffix: str = "") -> None:
        self.count += n
        self.suffix = suffix or self.suffix
        if self.enabled:
            width = 28
            done = int(width * self.count / max(self.total, 1))
            elapsed = time.perf_counter() - self.start
            rate = self.count / elapsed if elapsed > 0 else 0.0
            self.stream.write(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total} "
                              f"{rate:.1f}/s {self.suffix}  ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
