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


def short_reason(text: str, limit: int = 200) -> str:
    """The first sentence of a library's error message, cut at a word boundary if still long."""
    text = " ".join(str(text).split())
    first = text.split(". ")[0].rstrip(".")
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0] + " ..."


__all__ = ["short_reason", "EdgesegError", "ModelError", "SourceError", "UsageError", "CheckpointError",
           "ExportError", "TargetError", "DeployError"]
