"""Which processes of a killed command are still alive (test helper; pid reuse checked)."""

from __future__ import annotations


def descendants(pid: int) -> list:
    """``(psutil.Process, create time)`` of every descendant of ``pid`` now."""
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            out.append((child, child.create_time()))
        except psutil.Error:
            pass
    return out


def alive(procs: list) -> list[str]:
    """``"pid name"`` of those of ``procs`` (from :func:`descendants`) still running."""
    import psutil

    out = []
    for proc, created in procs:
        try:
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {proc.name()}")
        except psutil.Error:
            pass
    return out
