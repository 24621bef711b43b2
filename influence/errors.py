"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Bad input, reported as one line and exit status 2 by the scripts.

    The message names the bad value and, where it can, what would be valid:
    ``UserError(f"no images in {class_dir}")``.
    """


class ItemFailed(Exception):
    """One test image could not be explained (the solver diverged, non-finite numbers, an
    unreadable image). The batch job records the reason for that image and goes on."""
