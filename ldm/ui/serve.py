"""`python -m ldm ui [--ckpt FILE | --models-dir DIR] [--host 127.0.0.1] [--port 7860] [--listen]`: build the
page and serve it. Gradio's files (uploads, the copies of results it hands the browser) live under the
output folder (`GRADIO_TEMP_DIR`), which is the only folder it may serve (`allowed_paths`)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..errors import UsageError, run_command
from .models import find_checkpoints

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    from ..options import _Parser

    p = _Parser(prog="python -m ldm ui", description="the browser UI (Gradio: pip install -e '.[ui]')")
    p.add_argument("--ckpt", help="the checkpoint to serve (default: the built-in model); \"builtin\" names it")
    p.add_argument("--models-dir", "--models_dir", dest="models_dir",
                   help="serve every .ckpt/.safetensors checkpoint under this folder (a dropdown picks one)")
    p.add_argument("--outdir", default="outputs", help="where results go, as <outdir>/<command>-samples "
                                                       "(the commands' own defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (another than 127.0.0.1 needs --listen)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--listen", action="store_true", help="serve to other machines: bind 0.0.0.0 (or --host)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def host_for(args) -> str:
    if args.listen:
        return "0.0.0.0" if args.host in LOOPBACK else args.host
    if args.host not in LOOPBACK:
        try:
            loopback = ipaddress.ip_address(args.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise UsageError(f"--host {args.host} would serve other machines; add --listen to mean it")
    return args.host


def start(args, block: bool = True):
    """Build and launch; (demo, local URL). `block=False` returns at once (tests)."""
    checkpoints = find_checkpoints(args.ckpt, args.models_dir)
    host = host_for(args)
    outdir = Path(args.outdir).resolve()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{outdir}: cannot be made ({e.strerror}); pass another --outdir") from None
    os.environ["GRADIO_TEMP_DIR"] = str(outdir / ".gradio")  # read when components are built
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the UI needs Gradio: pip install -e '.[ui]'") from None
    from .app import CSS, Page, build

    demo = build(Page(checkpoints, outdir, args.device))
    demo.queue(default_concurrency_limit=1)
    print(f"serving {len(checkpoints)} checkpoint(s); results go to {outdir}", flush=True)
    _, url, _ = demo.launch(server_name=host, server_port=args.port, allowed_paths=[str(outdir)], show_error=True,
                            prevent_thread_lock=True, ssr_mode=False, quiet=True, footer_links=["api"],
                            css=CSS)
    print(f"open {url} in a browser (Ctrl-C stops the server)", flush=True)
    if block:
        demo.block_thread()
    return demo, url


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: (start(build_parser().parse_args(argv)), 0)[1])
