"""How a failure in another process reaches the training loop: the producer's crash (``ProducerCrashed``,
raised with its traceback), a child's exit code in words, and the fault file a data-loading worker leaves
its cause in."""

from __future__ import annotations

import os
import signal


class ProducerCrashed(RuntimeError):
    """The background producer died; the message carries its traceback."""


FAULT_ENV = "LESIONDIFFUSION_FAULT_FILE"


def record_fault(message: str) -> None:
    """Leave the cause of a fault in a data-loading worker where the training process finds it: the worker's
    own exception dies with it, and nnU-Net then only reports that its background workers are gone."""
    path = os.environ.get(FAULT_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(" ".join(message.split()) + "\n")
    except OSError:
        pass


def exit_reason(code: int | None) -> str:
    """Words for a child process's exit code (a negative code is the signal that ended it)."""
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name}: by hand (kill -9) or by the kernel when memory ran out"
    return f"ended by {name}"
