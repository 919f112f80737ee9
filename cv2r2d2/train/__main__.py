"""``python -m cv2r2d2.train``: see :func:`cv2r2d2.train.trainer.main`."""
from .trainer import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m cv2r2d2.train"))
