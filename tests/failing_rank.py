"""A stand-in training script for the launcher tests: ranks fail as the argument says.

- ok: both ranks finish;
- exit: rank 1 exits with code 3, rank 0 stops with the others (code 75) a moment later;
- kill: rank 1 is killed by SIGKILL, rank 0 waits to be stopped;
- together: both stop with the others (code 75).
"""

import os
import signal
import sys
import time

STOPPED_WITH_OTHERS = 75

if __name__ == "__main__":
    rank, how = int(os.environ["RANK"]), sys.argv[1]
    if how == "exit":
        time.sleep(0.5 * (rank == 0))
        sys.exit(3 if rank == 1 else STOPPED_WITH_OTHERS)
    if how == "together":
        sys.exit(STOPPED_WITH_OTHERS)
    if how == "kill":
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the launcher must stop this one when rank 1 fails
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} done", flush=True)
