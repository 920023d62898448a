import sys

from albef.cli import main

sys.exit(main())
