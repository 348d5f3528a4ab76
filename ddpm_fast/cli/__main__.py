"""`python -m ddpm_fast.cli ...` (what torchrun starts): the `ddpm-fast` command line."""

import sys

from ddpm_fast.cli import main

sys.exit(main())
