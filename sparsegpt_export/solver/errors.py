"""The solver's one error type."""


class SolverError(RuntimeError):
    """A layer could not be solved; the message names the layer."""
