"""``python -m FastSAM3DLib``: see :mod:`FastSAM3DLib.cli`."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl+C while Python is still importing the command line: one line, no traceback
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)

sys.exit(main())
