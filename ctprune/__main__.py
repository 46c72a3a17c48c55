import sys

from ctprune.cli import main

sys.exit(main())
