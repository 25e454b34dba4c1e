"""The exporter's one exception type."""


class ExportError(Exception):
    """A problem the user can fix, as one line; nothing was written."""
