"""`python -m ldm inpaint` as a script: the same code (ldm/special_run.py), runnable from a checkout without installing."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.special_run import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("inpaint", prog="tools/inpaint.py"))
