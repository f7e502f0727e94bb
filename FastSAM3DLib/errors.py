"""Exceptions whose messages tell the user what to do.

Every error the library raises on purpose derives from :class:`FastSAM3DError`; its message is written for
the person at the keyboard (a Slicer user or a script author), not for a developer reading a traceback.
"""


class FastSAM3DError(Exception):
    """A problem the user can fix; the message says how."""


class InputImageError(FastSAM3DError):
    """The image cannot be segmented as given (wrong dimension, NaN voxels, constant, empty...)."""


class PromptError(FastSAM3DError):
    """A click is unusable (outside the volume, no include point, wrong shape...)."""


class CheckpointError(FastSAM3DError):
    """A checkpoint file is missing, damaged, unsafe or made for another model."""


class WeightsUnavailableError(CheckpointError):
    """No weights for the requested model are available on this machine."""


class DataSourceError(FastSAM3DError, ValueError):
    """A folder, manifest or crop cache of image/label pairs cannot be read as given (also a ValueError)."""


class SettingError(FastSAM3DError, ValueError):
    """An option or environment variable has a value this version does not know (also a ValueError)."""


class DownloadError(FastSAM3DError):
    """Downloading a model file failed; only an interrupted transfer keeps its resumable ``.part`` file."""


class ModelOutputError(FastSAM3DError):
    """The model produced NaN or infinite numbers for a click; nothing was changed (local or on a server)."""


class OutOfMemoryError(FastSAM3DError):
    """The device ran out of memory; nothing was changed."""


class OutputFileError(FastSAM3DError, OSError):
    """An output file cannot be written where it was asked for (folder, name, type, full disk...); nothing was.

    Also an :class:`OSError` (with the ``errno`` of the failure where there was one), so code that handles
    file-system errors keeps working.
    """
