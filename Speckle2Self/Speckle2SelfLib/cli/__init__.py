"""The ``speckle2self`` command line (console entry point ``Speckle2SelfLib.cli:main``).

:mod:`.main` parses the command and runs train, denoise, info and export; the other
subcommands live in their own modules, loaded only when asked for: :mod:`.simulate`,
:mod:`.segment`, :mod:`.demo` and :mod:`.stream`. ``python -m Speckle2SelfLib.cli`` runs it too.
"""

from .main import main

__all__ = ["main"]
