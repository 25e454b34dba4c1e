"""The one exception npcam raises for bad input: files, images, bundles."""


class NpcamError(Exception):
    """A problem with the user's input, phrased as one line naming the file."""
