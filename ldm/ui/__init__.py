"""`python -m ldm ui`: the browser UI (Gradio, the optional `ui` extra: `pip install -e '.[ui]'`).

Nothing in `ldm` imports this package except the `ui` subcommand of ldm/cli.py, and only app.py, inputs.py,
stepview.py and serve.py (inside `start`) import gradio:
- runs.py: one run of a command from the page's settings: the command's own argv, parser, checks, sampling
  and SampleWriter, with a cached model, a per-step callback (progress, preview, Cancel);
- models.py: the checkpoints the server offers and which tab each family fits;
- stepview.py: the Steps tab's one run, kept step by step;
- pnginfo.py: the A1111 `parameters` text back into the txt2img form;
- inputs.py: image inputs whose unreadable uploads are a one-line message;
- app.py: the page (tabs, events, the named API endpoints); serve.py: the command line and launch.
"""
