"""The child process of ``sparta reproduce`` and ``sparta grid`` that runs one final evaluation.

``python -m sparta.commands.final_eval RUN_DIR DATA_ROOT N|None STEPS EPS|None N_PGD|None`` (the
arguments ``sparta.reproduce.child_args`` writes) runs ``sparta.reproduce.evaluate_final`` of one run:
each evaluation gets a process of its own because the attacks draw from torch's global RNG, which
evaluations in threads of one process would share. Its progress lines go to stdout; bad input is one
line ``error: ...`` on stderr and exit code 2 (the parent names the run and points at that line).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import SpartaError
from ..reproduce import FinalEval, evaluate_final

N = TypeVar("N", int, float)


def _number(text: str, kind: Callable[[str], N]) -> N | None:
    return None if text == "None" else kind(text)


def main(argv: list[str]) -> int:
    """Run the final evaluation ``argv`` (as ``child_args`` wrote it) describes; the exit code."""
    run_dir, data_root, n, steps, eps, n_pgd = argv
    try:
        evaluate_final(Path(run_dir), FinalEval(n=_number(n, int), steps=int(steps), eps=_number(eps, float),
                                                n_pgd=_number(n_pgd, int)),
                       Path(data_root), lambda line: print(line, flush=True))
    except SpartaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
