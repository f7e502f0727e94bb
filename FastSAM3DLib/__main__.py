"""``python -m FastSAM3DLib``: see :mod:`FastSAM3DLib.cli`."""
import sys

from .cli import main

sys.exit(main())
