"""Entry point of a simulation worker process:
``python -m fedloom.simulation.workerproc FD PARENT_PID``.

``FD`` is the worker's end of a socket pair made by its parent. The worker also ends
the moment its parent does (through a pidfd on Linux), even if it is busy in a task or
still starting, so no worker outlives the simulation that started it.
"""

import os
import select
import sys
import threading


def _exit_with(parent: int) -> None:
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        return  # no pidfd here: the worker still ends when its socket reaches EOF
    select.select([fd], [], [])  # readable once the parent has exited
    os._exit(0)


if __name__ == "__main__":
    parent = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    if os.getppid() != parent:
        sys.exit(0)  # the parent is gone already
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()

    from multiprocessing.connection import Connection

    from fedloom.simulation.worker import serve

    serve(Connection(int(sys.argv[1])))
