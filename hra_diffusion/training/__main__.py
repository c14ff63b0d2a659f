"""``python -m hra_diffusion.training dreambooth|control [--key value ...]``: a trainer without its entry script
(what ``train/*.py`` run; the comparison harness launches its runs this way)."""

import sys

from .runner import TASKS, run_script

if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
    print(f"usage: python -m hra_diffusion.training {{{','.join(TASKS)}}} [--config RECIPE.yaml] [--key value ...]",
          file=sys.stderr)
    sys.exit(2)
run_script(sys.argv[1], sys.argv[2:])
