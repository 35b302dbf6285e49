"""`modelpress run` that SIGKILLs itself inside the Nth GPTQ solve, as an OOM kill or eviction would stop a pod.

Usage: python killed_run.py N modelpress-run-arguments...
"""

import os
import signal
import sys

from modelpress.engine import gptq
from modelpress.runner.cli import main

solve, calls, cut = gptq.gptq, [0], int(sys.argv[1])


def dies_at_the_cut(*args, **kwargs):
    calls[0] += 1
    if calls[0] == cut:
        os.kill(os.getpid(), signal.SIGKILL)
    return solve(*args, **kwargs)


gptq.gptq = dies_at_the_cut
sys.exit(main(sys.argv[2:]))
