"""Errors shared by the block modules and registration."""


class UnsupportedLayerError(ValueError):
    """A structured block cannot represent this layer (or this configuration).

    Raised by block constructors; the message says why. Registration catches it
    and gives the layer a diagonal block instead (with the reason in the
    registration report), or re-raises it as a ValueError when the user asked
    for the structured block explicitly.
    """
