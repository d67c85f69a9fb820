"""The Gradio dashboard: launch distillation, watch jobs, compare sizes on a chart, chat side by side.

`build_app(services)` returns the Blocks; every handler is a plain function of `app.handlers`
that a test can call without a browser. Nothing here holds module-level state.
"""
