"""`boomerang app`: serve the dashboard (registered through the "boomerang.commands" entry points)."""

from __future__ import annotations

import os


def register(sub, helpers: dict) -> None:
    p = sub.add_parser("app", help="serve the dashboard (default http://127.0.0.1:7860)")
    p.add_argument("--host", default=os.environ.get("BOOMERANG_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("BOOMERANG_PORT", "7860")))
    p.add_argument("--auth", default=os.environ.get("BOOMERANG_AUTH"), help="USER:PASSWORD to require a login")
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
    from app.services import make_services
    from app.ui import CSS, build_app

    services = make_services(eval_data_dir=args.eval_data_dir, eval_tasks=args.eval_tasks, device=args.device)
    demo = build_app(services)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=4)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    print(f"Boomerang Studio on http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, show_error=True, css=CSS,
                share=False, inbrowser=False, footer_links=[])
    return 0
