"""``python -m codec.cli``: what torchrun starts (``torchrun --nproc_per_node N -m codec.cli train …``)."""

import sys

from . import main

sys.exit(main())
