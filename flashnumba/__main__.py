import sys

from flashnumba.cli import main

sys.exit(main())
