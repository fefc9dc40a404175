"""CPU threads for torch: a default that stays fast when other processes share the CPU.

    attnkit.set_threads(1)       # or ATTNKIT_THREADS=1 in the environment, or the CLI's --threads 1
    attnkit.set_threads("auto")  # the default: one thread per core that no other process is busy on
    attnkit.set_threads("torch") # leave torch's own setting alone

torch starts one thread per core and its threads wait for each other at every operation. When another process
keeps one of those cores busy, the waiting dominates and sampling gets 10-60x slower than with one thread
(``benchmarks/threads.py``: the bundled model's 25 steps took 0.8 s on one thread and 30-50 s on two while a
training job held the other core). So attnkit picks the thread count itself, when a pipeline is loaded
(:func:`attnkit.load_pipeline`) and before each sampling or inversion call, unless told otherwise:

1. ``set_threads(n)`` (the CLI's ``--threads n``) or ``ATTNKIT_THREADS=n``: ``n`` threads; ``"auto"``: the rule
   below; ``"torch"``: attnkit never touches torch's setting.
2. ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set, or ``torch.set_num_threads`` called since attnkit last
   set it: the user chose, attnkit leaves torch's setting alone. (A count set before attnkit's first call is
   kept as the upper limit of the automatic choice.)
3. Otherwise ``auto``: the cores this process may use (affinity mask and cgroup quota) minus the cores other
   processes kept busy over the last 0.1 s (Linux ``/proc/stat``; the 1-minute load average elsewhere), at
   least 1 and at most the count torch had when attnkit first used it. It is measured again at most every
   30 s, so a long-lived process follows its neighbours.
"""

from __future__ import annotations

import math
import os
import time

ENV = "ATTNKIT_THREADS"
REMEASURE_S = 30.0  # how long an automatic choice is trusted before the CPU is looked at again
WINDOW_S = 0.1  # how long the CPU is watched to see what the neighbours use

_choice: int | str | None = None  # what set_threads() asked for (None: the environment and the rules decide)
_startup: int | None = None  # torch's thread count when attnkit first needed it (its default or the user's)
_applied: int | None = None  # what attnkit itself last set
_measured_at = -math.inf


def _torch() -> object:
    import torch

    global _startup
    if _startup is None:
        _startup = torch.get_num_threads()
    return torch



def parse_threads(value: int | str, source: str = "threads") -> int | str:
    """A thread count, ``"auto"`` or ``"torch"`` from a number or text; a clear error otherwise."""
    from attnkit.notices import AttnkitError

    text = str(value).strip().lower()
    if text in ("auto", "torch"):
        return text
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise AttnkitError(f"{source} {value}: give a positive number of threads, 'auto' (attnkit's choice: the "
                           "cores no other process is busy on) or 'torch' (leave torch's setting alone)")
    return number


def set_threads(threads: int | str | None) -> None:
    """Fix the CPU threads attnkit gives torch: a positive int, ``"auto"``, ``"torch"`` (hands off) or None
    (back to the environment and the default rules, with torch's current count as the upper limit). Applied
    now and before every sampling call.
    ``attnkit.set_threads(1)``"""
    global _choice, _measured_at, _startup, _applied
    _choice = None if threads is None else parse_threads(threads)
    if _choice is None:  # asked to decide again: torch's count now is the new upper limit, nobody else's choice
        _startup = _applied = None
    _measured_at = -math.inf
    apply_threads()


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_times() -> dict[str, tuple[int, int]] | None:
    """Per-core (busy, total) jiffies from /proc/stat (Linux), or None."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            times[name[3:]] = (sum(values[:8]) - idle, sum(values[:8]))
    return times


def busy_cores(window: float = WINDOW_S) -> float | None:
    """Cores that *other* processes kept busy over the next ``window`` seconds (this process's own CPU time is
    subtracted), among the cores this process may use; None where ``/proc/stat`` is not available."""
    before, own_before, start = _cpu_times(), time.process_time(), time.perf_counter()
    if before is None:
        return None
    time.sleep(window)
    after, own_after, elapsed = _cpu_times(), time.process_time(), time.perf_counter() - start
    allowed = {str(c) for c in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set(before)
    busy = total = 0
    for cpu in allowed & set(before) & set(after or {}):
        busy += after[cpu][0] - before[cpu][0]
        total += after[cpu][1] - before[cpu][1]
    if total <= 0:
        return None
    cores = len(allowed & set(before))
    others = busy / total * cores - (own_after - own_before) / elapsed
    return max(0.0, others)


def auto_threads() -> int:
    """attnkit's default: usable cores minus the cores others keep busy now, at least 1 and at most torch's
    count at start-up. ``auto_threads()  # 1 on a 2-core machine where a training job holds one core``"""
    busy = busy_cores()
    if busy is None and hasattr(os, "getloadavg"):
        busy = os.getloadavg()[0]  # lags by up to a minute, but it is what macOS offers
    free = math.floor(usable_cores() - (busy or 0.0) + 0.1)  # a neighbour at 95% still counts as one core
    _torch()
    return max(1, min(free, _startup or free))


def _resolved_choice() -> int | str:
    if _choice is not None:
        return _choice
    if os.environ.get(ENV):
        return parse_threads(os.environ[ENV], ENV)
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return "torch"
    torch = _torch()
    current = torch.get_num_threads()
    if current != (_startup if _applied is None else _applied):
        return "torch"  # someone called torch.set_num_threads after attnkit was imported: theirs to decide
    return "auto"


def apply_threads() -> int:
    """Give torch the thread count the rules above choose (cheap when nothing changed); returns torch's count.
    Called by :func:`attnkit.load_pipeline`, :func:`attnkit.generate` and :func:`attnkit.invert`."""
    global _applied, _measured_at
    torch = _torch()
    choice = _resolved_choice()
    if choice == "torch":
        return torch.get_num_threads()
    if choice == "auto":
        if time.monotonic() - _measured_at < REMEASURE_S and _applied == torch.get_num_threads():
            return _applied
        choice = auto_threads()
        _measured_at = time.monotonic()
    if torch.get_num_threads() != choice:
        torch.set_num_threads(int(choice))
    _applied = int(choice)
    return _applied


def describe() -> str:
    """One line for records and ``--help``: the current choice and where it came from."""
    choice = _resolved_choice()
    torch = _torch()
    return f"{torch.get_num_threads()} ({choice if isinstance(choice, str) else 'fixed'})"
