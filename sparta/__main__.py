import os
import sys

from .cli import main

code = main()
if "WORLD_SIZE" in os.environ and "torch.distributed" in sys.modules:  # a torchrun worker
    from .distributed import exit_worker

    exit_worker(code)
sys.exit(code)
