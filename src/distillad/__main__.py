"""`python -m distillad`: the command line as a module, so torchrun can start it (`torchrun -m distillad train`)."""

import sys

from distillad.cli import main

sys.exit(main())
