"""Speckle2Self: self-supervised ultrasound despeckling (library used by the Slicer module and the CLI).

This package never imports qt, ctk or slicer.app, so it runs in plain Python, in Slicer's
Python console and in tests. torch is imported lazily by the modules that need it.
"""

__version__ = "0.2.0"
