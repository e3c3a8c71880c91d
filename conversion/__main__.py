import os
import sys

from .cli import main

code = main()
if code == 2:
    # An input error has been reported in one line. Leave without interpreter teardown, where
    # orbax/tensorstore background threads of an aborted save would print tracebacks into a
    # closed event loop; partial checkpoint directories are removed on the next start.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
