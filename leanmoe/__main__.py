import sys

from leanmoe.cli import main

sys.exit(main())
