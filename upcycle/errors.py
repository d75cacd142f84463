"""Typed errors with one-line messages; the CLI turns them into exit codes."""


class UpcycleError(Exception):
    """Base class: the message is one line a user can act on."""

    exit_code = 1


class InputError(UpcycleError):
    """The input model or data is missing, malformed or inconsistent."""


class UnsupportedError(UpcycleError):
    """The request is well formed but upcycle cannot do it exactly."""


class OptionError(UpcycleError):
    """Options that contradict each other or the model."""

    exit_code = 2


class OutputError(UpcycleError):
    """The output location cannot be written."""
