"""Entry point of a simulation worker process: ``python -m fedloom.runtime.workerproc FD``.

``FD`` is the worker's end of a socket pair made by its parent.
"""

import sys
from multiprocessing.connection import Connection

from fedloom.runtime.worker import serve

if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
