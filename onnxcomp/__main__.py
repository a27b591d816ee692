"""``python -m onnxcomp``: same as the ``onnxcomp`` command."""

import sys

from onnxcomp.cli import main

sys.exit(main())
