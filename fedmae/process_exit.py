"""A quicker exit for fedmae's own processes: skip the interpreter's last garbage collection.

With torch, timm and MONAI imported, CPython's collection at exit walks every object those
libraries created: a process that imported ``sites.app`` took 1.49 s to exit on a 2-core machine
here, 0.22 s without that collection (``benchmarks/process_exit.py``). Every fedmae process pays
it: the CLI, each comparison worker, the ServerApp, and a deployed site's ClientApp, which Flower
starts anew for every message. The memory goes back to the operating system either way. Nothing is
lost by not collecting cycles at exit: every file fedmae writes is closed where it is written
(atomic writes; trackers closed by their runs), and logging flushes its handlers in its own exit
handler, which runs after this one (exit handlers run last-registered first, and logging registers
on import). Only fedmae's entry points call this (the CLI, a comparison worker's start, and the
Flower apps ``sites/app.py`` and ``server/app.py`` on import); importing ``fedmae`` changes nothing.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_final_collection() -> None:
    """At this process's exit, freeze the objects alive then, so the final collection skips them."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
