"""The trainer's one error type: a run that cannot start or must stop; the message says why and what to do."""


class TrainError(RuntimeError):
    """A run that cannot start or must stop; the message says why and what to do."""
