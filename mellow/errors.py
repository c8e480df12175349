"""Errors of the heavy modules that the command line turns into exit codes, defined here (no torch) so that
`mellow.cli` names them without importing those modules."""


class TooManyFailuresError(RuntimeError):
    """More clips failed than --max-failures allows (the store itself is complete and usable)."""


class PeerLostError(RuntimeError):
    """Another process of a multi-process run died or stopped answering."""

