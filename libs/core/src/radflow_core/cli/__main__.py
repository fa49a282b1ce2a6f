import sys

from radflow_core.cli.main import main

sys.exit(main())
