"""A fault-injection hook for the crash tests: kill this process at a named point.

    BENCH_FAULT=<point>[@<n>]   the n-th time (default: the first) the process reaches <point>,
                                it sends itself SIGKILL: no cleanup, no flush, as a node failure
    BENCH_FAULT_SIGNAL=TERM     sends SIGTERM instead (what `kill`, a scheduler or a container
                                runtime sends to stop a process)

Points:
    step:<k>            right after optimiser step k of pretraining (and its log line)
    write:<file name>   inside an atomic write of that file (e.g. last.pt, linear.json): the
                        data is in the temporary file, not yet renamed over the real one

It lets tests kill a real `bench run` deterministically at the moments that matter. Unset (as
always outside tests) it costs one environment lookup per point and does nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BENCH_FAULT"
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get('BENCH_FAULT_SIGNAL', 'KILL')}"))
