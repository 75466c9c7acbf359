"""A stand-in training script for the launcher tests: rank RANK fails as its argument says."""

import os
import signal
import sys
import time

if __name__ == "__main__":
    rank, how = int(os.environ["RANK"]), sys.argv[1]
    if rank == 1 and how == "exit":
        sys.exit(3)
    if rank == 1 and how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how != "ok":
        time.sleep(60)  # the launcher must stop this one when rank 1 fails
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} done", flush=True)
