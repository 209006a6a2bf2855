"""Stand-in workers for the sweep's failure tests: ``python -m fake_worker MODE`` via run_one."""

import os
import signal
import sys
import time

if __name__ == "__main__":
    mode = os.environ.get("FAKE_WORKER_MODE", "crash")
    if mode == "crash":  # what the kernel's OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "hang":
        time.sleep(600)
    elif mode == "raise":
        raise MemoryError("simulated out of memory")
    sys.exit(3)
