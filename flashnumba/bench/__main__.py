"""python -m flashnumba.bench: see flashnumba.bench."""

import sys

from flashnumba.bench import main

sys.exit(main())
