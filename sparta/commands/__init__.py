"""The command layer: what the ``sparta`` subcommands do once ``sparta.cli`` has parsed their arguments.

Modules here may print (they are the commands); library modules never do and never parse flags.
``sparta.cli`` keeps argparse and calls into these modules; nothing in the library imports from here
except the commands that run another command's work (``sparta.export``, ``sparta.reproduce``).

- ``flops``: ``sparta flops``, the FLOPs report of a config or checkpoint.
- ``evaluate``: ``sparta eval``, the test-set robustness of a checkpoint, and its printing.
- ``final_eval``: the child process that runs one final evaluation of ``sparta reproduce`` / ``sparta grid``.

Nothing is imported here, so ``python -m sparta.commands.final_eval`` loads only what it uses.
"""
