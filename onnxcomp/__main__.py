"""``python -m onnxcomp``: same as the ``onnxcomp`` command."""

import sys

from onnxcomp.cli import main

if __name__ == "__main__":  # process pools (spawn) re-import the main module in workers
    sys.exit(main())
