"""The exit codes of every ``speckle2self`` command: one table (documented in docs/reliability.md)."""

#: Done.
EXIT_OK = 0
#: The run failed, or some files of a folder run failed.
EXIT_FAILED = 1
#: Bad input, options or output paths: nothing was computed or written.
EXIT_BAD_INPUT = 2
#: ``speckle2self segment``: a result was flagged as implausible (its mask is not written).
EXIT_FLAGGED = 3
#: Interrupted (Ctrl-C: 128 + SIGINT).
EXIT_INTERRUPTED = 130
#: Terminated (SIGTERM: 128 + 15).
EXIT_TERMINATED = 143
