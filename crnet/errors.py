"""Exception types. The CLI turns every `CRNetError` into one line on stderr and exit code 2."""


class CRNetError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class DataError(CRNetError):
    """A data root, image or mask cannot be used."""


class NotAVOCTreeError(DataError):
    """The data root does not have the VOC layout."""


class ImageReadError(DataError):
    """An image or mask file is missing or cannot be decoded."""


class MaskError(DataError):
    """A mask has the wrong size or values outside the allowed set."""


class EmptySupportMaskError(MaskError):
    """A support mask marks no foreground pixel, so it defines no prototype."""


class NoSupportError(CRNetError):
    """An episode was given zero support images."""


class CheckpointError(CRNetError):
    """A checkpoint or weight file is missing, corrupt or incompatible."""


class CRNetWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI shows it as one `warning:` line)."""
