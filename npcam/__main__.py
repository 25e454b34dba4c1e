import os
import sys

from .cli import EXIT_INTERRUPTED, main

code = main()
if code == EXIT_INTERRUPTED:
    # Interrupted, with every finished file already written and closed: leave without the interpreter's teardown,
    # in which a library's native threads still running (Ray's, onnxruntime's) can abort the process instead of
    # letting it exit with 130.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
