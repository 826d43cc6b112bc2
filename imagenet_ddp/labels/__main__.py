"""The command line of the class-name tables: build them, or count where their names came from.

    python -m imagenet_ddp.labels build --langs es,fr --offline --from-shipped
    python -m imagenet_ddp.labels coverage

It lives here, apart from the tables (imagenet_ddp.labels), because the builder
(imagenet_ddp.labels_build) imports the tables and the tables must not import the builder.
"""

import sys

from imagenet_ddp.labels_build import main

if __name__ == "__main__":
    sys.exit(main())
