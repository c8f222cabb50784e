"""Typed service errors; app.py maps each (and the store's) to one HTTP status, so routes never build responses."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the errors the service raises itself."""


class UnauthorizedError(ServiceError, PermissionError):
    """A missing or wrong X-API-Key on an endpoint that needs one (401)."""


class InvalidIdError(ServiceError, ValueError):
    """A model or job id that is not a safe relative name under its root (422)."""


class ModelNotFoundError(ServiceError, FileNotFoundError):
    """No model file for this id under the runs root (404)."""


class JobNotFoundError(ServiceError, LookupError):
    """No job record with this id (404)."""


class ModelExistsError(ServiceError, FileExistsError):
    """An upload to a model id that already names a model (409): models are never overwritten."""


class ModelFileError(ServiceError, ValueError):
    """An uploaded file that is not a model file this service can load (400)."""


class JobStateError(ServiceError, RuntimeError):
    """The job is in a state that does not allow this action, e.g. cancelling a finished job (409)."""


class PayloadTooLargeError(ServiceError, ValueError):
    """A body, an upload, an image or an id list larger than the configured limit (413)."""


class ImageDecodeError(ServiceError, ValueError):
    """An upload that is not a readable PNG or JPEG image (400); `filename` names it."""

    def __init__(self, message: str, *, filename: str | None = None):
        super().__init__(message)
        self.filename = filename


class JobConfigError(ServiceError, ValueError):
    """A job request that validates as JSON but cannot run: paths outside the roots, missing inputs (422)."""
