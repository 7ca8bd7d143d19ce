"""``python -m mtlvision`` runs the command line (also under torchrun)."""

import sys

from mtlvision.cli import main

sys.exit(main())
