"""The ``speckle2self`` command line (console entry point ``Speckle2SelfLib.cli:main``).

:mod:`.main` builds the parser and dispatches; each subcommand is a module: :mod:`.train`,
:mod:`.denoise`, :mod:`.info`, :mod:`.export`, and, loaded only when asked for, :mod:`.simulate`,
:mod:`.segment`, :mod:`.demo` and :mod:`.stream`; :mod:`.options`: the option types they share. ``python -m Speckle2SelfLib.cli`` runs it too.
"""

from .main import main

__all__ = ["main"]
