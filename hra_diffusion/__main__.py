"""``python -m hra_diffusion``: the same command as ``hra-diffusion``."""

import sys

from .cli import main

sys.exit(main())
