"""Named points where a test can kill a run the way ``kill -9`` would, to prove that nothing is lost.

    METAOPT_FAULT=outer-step-1 metaopt run metamd --local ...   # dies right after outer step 1 is checkpointed

:func:`fault_point` does nothing unless ``$METAOPT_FAULT`` names the point; then it sends SIGKILL to
the calling process's whole process group (the ``metaopt run`` process and the step it started),
so no ``finally``, exit handler or ``atexit`` runs. Tests start the run in a new session
(``subprocess.Popen(..., start_new_session=True)``) so that only the run dies. The points:

- ``outer-step-<k>``: outer step ``k`` is checkpointed and logged (meta-training);
- ``meta-test``: the meta-test starts (meta-training is complete);
- ``register-model``: the registered model exists, its version not yet;
- ``register-version``: the version exists, its gate decision is not recorded yet.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "METAOPT_FAULT"


def fault_point(name: str) -> None:
    """Kill this process group with SIGKILL if ``$METAOPT_FAULT`` is ``name``; otherwise return."""
    if os.environ.get(FAULT_ENV, "") == name:
        os.killpg(os.getpgrp(), signal.SIGKILL)


__all__ = ["FAULT_ENV", "fault_point"]
