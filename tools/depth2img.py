"""`python -m ldm depth2img` as a script: the same code (ldm/special_run.py), runnable from a checkout without installing."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.special_run import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("depth2img", prog="tools/depth2img.py"))
