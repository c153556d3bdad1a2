import sys

from lcnn_jax.cli import main

sys.exit(main())
