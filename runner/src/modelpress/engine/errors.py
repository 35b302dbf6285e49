"""The one error type users see for bad input: a message that names the field and the fix."""


class ModelPressError(ValueError):
    """Bad input or an impossible request, detected before (or instead of) a crash."""
