"""``python -m cv2r2d2.train``: ``cv2r2d2 train`` (see :func:`cv2r2d2.cli.train_main`)."""
from ..cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main(prog="python -m cv2r2d2.train"))
