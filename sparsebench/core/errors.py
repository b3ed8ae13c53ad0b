"""User-facing errors: each carries one line that names the fix."""


class SparsebenchError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str = ""):
        # one line, whatever the user typed (a value may hold a newline)
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class ConfigError(SparsebenchError):
    pass


class ModelUnavailable(SparsebenchError):
    pass


class DataUnavailable(SparsebenchError):
    pass


class UnsupportedArchitecture(SparsebenchError):
    pass


class NonFiniteActivation(SparsebenchError):
    """NaN/inf appeared in an MLP output; the message names the layer."""
