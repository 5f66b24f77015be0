"""One exception hierarchy for user errors, shared by the agent and the host.

Everything a user can get wrong (a bad path, a model that is not ONNX, a source that cannot be
opened, a target without onnxruntime) raises a subclass of :class:`EdgesegError`.  The CLIs catch
it once in ``main()`` and turn it into a one-paragraph message and a non-zero exit code.
"""


class EdgesegError(Exception):
    """A user-facing error: ``message`` says what was wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message, hint=""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        if self.hint:
            return "{} {}".format(self.message.rstrip(), self.hint)
        return self.message


class UsageError(EdgesegError):
    """A bad option or argument value."""


class ModelError(EdgesegError):
    """A model file that cannot be read, is not ONNX, or lacks the edgeseg contract."""


class SourceError(EdgesegError):
    """A frame source that cannot be opened or read."""
