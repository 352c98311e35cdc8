import sys

from lensjax.train.cli import main

sys.exit(main())
