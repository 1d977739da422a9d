"""Settings of a process that runs downloads only (the CLI's download commands, the download's fork server), made
through the environment because the libraries read them once, as they load: so they are applied before the first
import of numpy in that process, and a value already set wins. Standard library only, for that reason.
"""

from __future__ import annotations

import os

# OpenBLAS, numpy's BLAS, starts a thread per further core as numpy is imported, and each busy-waits for work for
# about 2^28 cycles (OPENBLAS_THREAD_TIMEOUT) before it sleeps. The download never multiplies matrices big enough to
# use them (the pHash's 32x32 products run on the calling thread), so all they do is take a core from the imports
# on a download's critical path: about 0.05 CPU s in each of the CLI's process and the fork server on 2 cores, and
# 4% of a 1,000-image download's wall time (benchmarks/bench_download.py --sizes laion).
SINGLE_THREADED_BLAS = {"OPENBLAS_NUM_THREADS": "1"}


def single_threaded_blas() -> None:
    """Keep BLAS libraries loaded after this from starting threads of their own (in this process and the processes
    it starts)."""
    for name, value in SINGLE_THREADED_BLAS.items():
        os.environ.setdefault(name, value)

