"""Errors the CLI turns into one-line messages with exit status 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do. Exit status 2."""

    exit_code = 2


class VerificationError(Exception):
    """The exported model does not match the eager reference. Exit status 1."""

    exit_code = 1


class BackendMissing(Exception):
    """An optional backend (TensorRT, Core ML, CUDA) is not installed. Exit status 3."""

    exit_code = 3
