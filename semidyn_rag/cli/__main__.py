"""``python -m semidyn_rag.cli COMMAND ...`` (also what ``torchrun -m semidyn_rag.cli`` runs)."""

import sys

from . import main

sys.exit(main())
