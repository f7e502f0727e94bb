"""``python -m FastSAM3DLib.server``: see :mod:`FastSAM3DLib.server.command`."""
import sys

from .command import main

sys.exit(main())
