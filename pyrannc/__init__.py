"""The import name RaNNC's scripts use: the same API as `rannc`."""

from rannc import *  # noqa: F401,F403
from rannc import __all__, __version__  # noqa: F401
