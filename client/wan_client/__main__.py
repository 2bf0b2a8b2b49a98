"""`python -m wan_client`: the command-line client (`wan_client.client.main`)."""

import sys

from wan_client.client import main

if __name__ == "__main__":
    sys.exit(main())
