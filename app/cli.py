"""`boomerang app`: serve the dashboard (registered through the "boomerang.commands" entry points)."""

from __future__ import annotations

import os
import sys


def register(sub, helpers: dict) -> None:
    p = sub.add_parser("app", help="serve the dashboard (default http://127.0.0.1:7860)")
    p.add_argument("--host", default=os.environ.get("BOOMERANG_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("BOOMERANG_PORT", "7860")))
    p.add_argument("--auth-file", default=os.environ.get("BOOMERANG_AUTH_FILE"),
                   help="a file whose first line is USER:PASSWORD: require a login (or set BOOMERANG_AUTH)")
    p.add_argument("--auth", default=None, help="USER:PASSWORD inline (other users can read it in the process list; "
                                                "prefer --auth-file or BOOMERANG_AUTH)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder whose files the browser may name as teacher or data, besides BOOMERANG_HOME, the "
                        "working directory and the hub cache; repeatable")
    p.add_argument("--max-queue", type=int, default=int(os.environ.get("BOOMERANG_MAX_QUEUE", "16")),
                   help="requests waiting at most; more are answered 'busy' at once instead of hanging")
    p.add_argument("--eval-data-dir", default=os.environ.get("BOOMERANG_EVAL_DATA_DIR"),
                   help="default folder of local evaluation files for the Evaluate button")
    p.add_argument("--eval-tasks", default=os.environ.get("BOOMERANG_EVAL_TASKS", ""))
    p.add_argument("--device", default="cpu", help="device for chat models")
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from starlette.middleware import Middleware  # only when the dashboard starts

    from app.auth import LoginThrottle, credentials  # the dashboard (gradio) only when it starts
    from app.services import make_services  # the dashboard (gradio) only when it starts
    from app.ui import CSS, I18N, build_app  # the dashboard (gradio) only when it starts

    auth = credentials(auth=args.auth, auth_file=args.auth_file)  # a bad value fails before anything starts
    if args.auth:
        print("warning: --auth shows the password in the process list; prefer --auth-file or BOOMERANG_AUTH",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"warning: serving on {args.host} without a login: anyone who reaches this port can launch jobs; "
              "see docs/security.md", file=sys.stderr)
    services = make_services(eval_data_dir=args.eval_data_dir, eval_tasks=args.eval_tasks, device=args.device,
                             allowed_roots=tuple(args.allow_path))
    demo = build_app(services)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=4)
    print(f"Boomerang Studio on http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, show_error=False, css=CSS, i18n=I18N,
                share=False, inbrowser=False, footer_links=[], app_kwargs={"middleware": [Middleware(LoginThrottle)]})
    return 0
