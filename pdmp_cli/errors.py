"""The exceptions users see: one-line messages that name the problem and the fix."""


class PdmpError(Exception):
    """Raised for bad input or state; the CLI prints it on one line and exits with code 2."""


class TrainingDiverged(PdmpError):
    """The training loss became NaN or infinite in `epoch`; the run stops and is marked failed."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: its state up to the last finished epoch is saved; the CLI exits with 130.

    A KeyboardInterrupt, so that a grid stops too instead of recording a failure and going on.
    """
