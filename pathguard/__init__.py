"""``pathguard``: the command line of PathGuard.

This package sits on top: it imports :mod:`detector` and :mod:`service`, and neither imports it. Each
subcommand is a module here whose flags and ``PATHGUARD_*`` variables come from typed configs through
:mod:`pathguard.options`.
"""
