"""Peak resident memory of a process tree (this process and all its descendants), sampled from /proc.

    with TreeRSS() as rss:
        work()
    rss.peak_bytes      # max over samples of the summed RSS of the tree

Linux only (reads /proc/<pid>/status and /proc/<pid>/task/*/children); sampling every 20 ms can
miss spikes shorter than that.
"""

from __future__ import annotations

import os
import threading


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and all its descendants now."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss(pid)
        stack.extend(_children(pid))
    return total


class TreeRSS:
    """Context manager sampling the summed RSS of this process's tree in a background thread."""

    def __init__(self, interval: float = 0.02, root: int | None = None):
        self.interval = interval
        self.root = root or os.getpid()
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeRSS":
        self.peak_bytes = tree_rss(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.root))
