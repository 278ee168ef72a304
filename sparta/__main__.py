import os
import sys

from .cli import main

code = main()
if "WORLD_SIZE" in os.environ and "torch.distributed" in sys.modules:
    # A torchrun worker, which has left its process group by now. A gloo worker thread may still be
    # destroying the last collective's tensors, which takes the GIL; once the interpreter finalizes,
    # that thread is unwound and the process aborts ("terminate called without an active exception")
    # after the run ended cleanly. Everything this process wrote is closed, so end it here instead.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
