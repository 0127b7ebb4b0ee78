"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""
import difflib


class BenchError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""


class UnknownName(BenchError, KeyError):
    def __init__(self, kind: str, name: str, known):
        known = sorted(known)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none)'}.")
        self.kind, self.name = kind, name

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class MissingData(BenchError):
    def __init__(self, what: str, path, expected: str, how: str = ""):
        msg = f"{what} not found at {path}.\nExpected layout:\n{expected}"
        if how:
            msg += f"\n{how}"
        super().__init__(msg)


class ManifestError(BenchError):
    """A pruned checkpoint (manifest + safetensors) is corrupt or does not match its architecture."""


class CellFailure(Exception):
    """A cell could not finish (NaN loss, out of memory, ...): reported with its reason; other cells go on."""
