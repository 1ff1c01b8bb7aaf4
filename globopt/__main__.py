import sys

from globopt.cli import main

sys.exit(main())
