#!/usr/bin/env python3
"""Exec to vmm's start, which vmm cannot see itself: runs `vmm ... --trace TRACE` and prints one JSON
object with the CLOCK_MONOTONIC time just before vmm's process was spawned (exec_ns), vmm's
start on the same clock from its trace (start_ns, otherData.start_clock_monotonic_ns), timings_ms.setup
from the trace (its start to first KVM_RUN), and the exit status (rc).

    exec-stamp.py TRACE VMM [ARGS...]      (TRACE is passed to vmm as --trace TRACE)
"""
import json
import os
import sys
import time


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    trace, argv = sys.argv[1], sys.argv[2:] + ["--trace", sys.argv[1]]
    try:
        os.unlink(trace)  # a failed run must not leave an earlier run's trace to be read
    except FileNotFoundError:
        pass
    devnull = os.open(os.devnull, os.O_RDWR)
    # posix_spawn, as a scheduler's runtime (and Rust's Command) starts a process: glibc uses
    # clone(CLONE_VM|CLONE_VFORK), so the new process's exec has no copy of this interpreter's memory to
    # tear down, and the stamp taken just before it covers the spawn and the exec themselves.
    exec_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    pid = os.posix_spawn(argv[0], argv, os.environ,
                         file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                       (os.POSIX_SPAWN_DUP2, devnull, 1)])
    _, status = os.waitpid(pid, 0)
    record = {"rc": os.waitstatus_to_exitcode(status), "exec_ns": exec_ns, "start_ns": None,
              "setup_ms": None}
    try:
        with open(trace) as f:
            other = json.load(f)["otherData"]
        record["start_ns"] = other.get("start_clock_monotonic_ns")
        record["setup_ms"] = other.get("timings_ms", {}).get("setup")
    except (OSError, ValueError, KeyError):
        pass
    print(json.dumps(record))


main()
