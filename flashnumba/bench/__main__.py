"""python -m flashnumba.bench: see flashnumba.bench.run."""

import sys

from flashnumba.bench.run import main

sys.exit(main())
