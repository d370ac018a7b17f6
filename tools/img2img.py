"""The original scripts/img2img.py command line on ldm; the same code as `python -m ldm img2img`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.generate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("img2img", prog="tools/img2img.py"))
