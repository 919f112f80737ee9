"""``python -m cv2r2d2 ...``: the ``cv2r2d2`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
