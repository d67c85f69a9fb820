"""The Gradio dashboard: launch distillation, watch jobs, compare sizes on a chart, chat side by side.

`app.ui.build_app(services)` returns the Blocks; each tab is a module (`launch`, `jobs`, `compare`, `chat`)
whose handlers are plain functions a test can call without a browser, and `common` holds what they
share. Nothing here holds module-level state.
"""
