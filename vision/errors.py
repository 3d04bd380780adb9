"""The failures a user can act on, one type each."""


class ScanError(Exception):
    """A scan that cannot be read as an image; the message is the reason recorded for it."""


class ModelError(Exception):
    """A model file or card that cannot be used; the message says which and why."""
