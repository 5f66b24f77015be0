"""Host-side user errors; all derive from the shared :class:`EdgesegError`."""

from edgeseg.device.errors import EdgesegError, ModelError, SourceError, UsageError


class CheckpointError(EdgesegError):
    """A checkpoint that is missing, unreadable, or does not fit the architecture."""


class ExportError(EdgesegError):
    """Export, simplification or quantization could not produce a valid model."""


class TargetError(EdgesegError):
    """A target that cannot be reached, is not trusted, or lacks what the agent needs."""


class DeployError(EdgesegError):
    """Upload, verification or switch-over on the target failed."""


__all__ = ["EdgesegError", "ModelError", "SourceError", "UsageError", "CheckpointError",
           "ExportError", "TargetError", "DeployError"]
