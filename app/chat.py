"""The Chat tab: one message to any size of a family and to the teacher at once, both replies streamed side
by side; export the size, or see how to call it through the OpenAI API."""

from __future__ import annotations

import uuid
from pathlib import Path

import gradio as gr
import torch

from app.common import (
    CUT,
    MAX_MESSAGE,
    bind,
    check_sources,
    check_text,
    family_choices,
    patched_text,
    quick_to_load,
    safe,
    student_folder,
    teacher_choices,
)
from boomerang.errors import BoomerangError
from boomerang.export import export_size, export_size_gguf, gguf_run_lines
from boomerang.export_gguf import check_gguf_type, llama_cpp_available
from boomerang.family import ENDS, check_ends
from boomerang.generation import Sampling, stream_pair
from boomerang.servers import running_servers
from boomerang.student import open_family


def loads_at_once(family_id: str) -> bool:
    """Whether opening a family needs no conversion or download first (a distilled one always qualifies:
    its teacher was loaded to distill it)."""
    return not str(family_id).startswith(CUT) or quick_to_load(str(family_id)[len(CUT):])


def chat_family_choices(services) -> list[tuple[str, str]]:
    """The distilled families, then each known teacher's undistilled family (labelled so)."""
    cut = [(f"{t}: undistilled sizes (the teacher's layers dropped, no training)", f"{CUT}{t}")
           for t in teacher_choices(services)]
    return family_choices(services) + cut


def _family(services, family_id, ends: str = "student"):
    """(teacher, family, distilled) for a chat family value; None when none is picked. `ends`: see
    `boomerang.family.ENDS` (an undistilled family's ends are the teacher's either way)."""
    if not family_id:
        return None
    if str(family_id).startswith(CUT):
        source = str(family_id)[len(CUT):]
        check_sources(services, source)
        teacher, fam = services.models.cut_family(source)
        return teacher, fam, False
    folder = student_folder(services, family_id)
    if folder is None:
        return None
    teacher, fam = services.models.family(folder, ends=check_ends(ends or "student"))
    return teacher, fam, True


def size_choices(services, student_id) -> tuple[list[int], int] | None:
    """(the sizes the family has, the one picked first: the middle one) for a family; None without one."""
    picked = _family(services, student_id)
    if picked is None:
        return None
    counts = picked[1].layer_counts
    return counts, counts[len(counts) // 2]


def size_label(services, student_id, n_layers, ends: str = "student") -> str:
    picked = _family(services, student_id, ends)
    if picked is None or not n_layers:
        return ""
    _, fam, distilled = picked
    try:
        info = fam.info(int(n_layers))
    except BoomerangError as exc:
        return str(exc)
    kind = "the teacher" if info.is_teacher else "the student" if info.is_student else patched_text(len(info.patched))
    if distilled and not (info.is_teacher or info.is_student) and fam.ends != "student":
        embeddings, head = fam.ends_for(info.patched)
        kind += f" · embeddings from the {embeddings}, norm and head from the {head}"
    if not distilled and not info.is_teacher:
        kind += " · undistilled: the teacher with layers dropped, not trained"
    return f"**{info.n_layers} layers** · {info.params / 1e6:.1f}M parameters · {kind}"


def _messages(history: list[dict], system: str, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        msgs.append({"role": m["role"], "content": content})
    return msgs + [{"role": "user", "content": user}]


def chat_turn(services, student_id, n_layers, message: str, left: list, right: list, system: str,
              temperature, top_p, max_new_tokens, stop: str = "api", ends: str = "student"):
    """Stream one turn to a size (left) and the teacher (right) at once; yields (left, right, left stats, right stats)."""
    picked = _family(services, student_id, ends)
    if picked is None or not message or not message.strip():
        yield left, right, "Pick a family and type a message.", ""
        return
    check_text("the message", message, MAX_MESSAGE)
    check_text("the system prompt", system, MAX_MESSAGE)
    teacher, fam, _ = picked
    size = fam.build(int(n_layers))
    stop = services.stop_event(stop)  # the session's token: Stop sets the same event
    stop.clear()
    sides = [(size, _messages(left, system, message)), (fam.teacher, _messages(right, system, message))]
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p))  # checked before any work
    base_l = left + [{"role": "user", "content": message}]
    base_r = right + [{"role": "user", "content": message}]
    for a, b in stream_pair(sides, teacher.tokenizer, sampling, stop):
        yield (base_l + [{"role": "assistant", "content": a.text}], base_r + [{"role": "assistant", "content": b.text}],
               f"{n_layers} layers: {a.stats()}", f"teacher: {b.stats()}")


EXPORT_FORMATS = [("Hugging Face folder", "hf"), ("GGUF f16 (llama.cpp, Ollama)", "f16"), ("GGUF bf16", "bf16"),
                  ("GGUF q8_0 (half the size)", "q8_0")]
"""The Export choices; the llama.cpp k-quants join them where the optional extra is installed."""


def export_formats() -> list[tuple[str, str]]:
    extra = [("GGUF q4_k_m (llama.cpp's quantizer)", "q4_k_m")] if llama_cpp_available() else []
    return EXPORT_FORMATS + extra


def export_chosen(services, student_id, n_layers, ends: str = "student", fmt: str = "hf"):
    """Write the chosen size; returns (message, the GGUF file to download or None)."""
    folder = student_folder(services, student_id)
    if folder is None:
        raise BoomerangError("pick a distilled family first" if not str(student_id or "").startswith(CUT) else
                             "nothing to export: the sizes of an undistilled family are the teacher with layers dropped")
    ends = check_ends(ends or "student")
    fmt = fmt or "hf"
    if fmt != "hf":
        check_gguf_type(fmt)
    opened = services.models.opened(folder, ends=ends)
    if next(opened.family.student.parameters()).dtype != torch.float32:  # chat runs in bfloat16; export as trained
        opened = open_family(folder, ends=ends, dtype="float32", device=services.models.device)
    name = f"student-{student_id}-{int(n_layers)}L{'' if ends == 'student' else '-' + ends + '-ends'}"
    Path(services.exports_dir).mkdir(parents=True, exist_ok=True)
    if fmt != "hf":
        out = Path(services.exports_dir) / f"{name}-{fmt}.gguf"
        path = export_size_gguf(opened.family, int(n_layers), out, type_=fmt, tokenizer=opened.teacher.tokenizer,
                                teacher_source=opened.teacher.source, student_source=folder, overwrite=True)
        size = path.stat().st_size / 2**20
        lines = gguf_run_lines(path).replace("\n", "  \n")
        return (f"Exported the {int(n_layers)}-layer size as GGUF {fmt} ({size:.1f} MiB) to `{path}`, with an Ollama "
                f"Modelfile beside it. Download it below, or  \n{lines}"), str(path)
    out = Path(services.exports_dir) / name
    path = export_size(opened.family, int(n_layers), out, tokenizer=opened.teacher.tokenizer,
                       teacher_source=opened.teacher.source, student_source=folder, overwrite=out.exists(),
                       distilled=opened.manifest.distilled is not None)
    return f"Exported the {int(n_layers)}-layer size to `{path}` (loads with plain transformers).", None


def serving_snippet(services, student_id, n_layers) -> str:
    """How to call this size from code: the running server's URL and a snippet, or the command that starts one."""
    folder = student_folder(services, student_id)
    if folder is None or not n_layers:
        return ""
    folder = str(Path(folder).expanduser().resolve())
    server = next((s for s in running_servers() if s.get("student") == folder), None)
    if server is None:
        return (f"Call every size of this family from your own code through the OpenAI API: "
                f"`boomerang serve --student {folder}` (docs/serving.md).")
    model = server["sizes"].get(str(int(n_layers)))
    if model is None:
        return f"The server at `{server['url']}` has no {int(n_layers)}-layer size."
    key = "$BOOMERANG_API_KEY" if server.get("auth") else "none"
    header = ' -H "Authorization: Bearer $BOOMERANG_API_KEY"' if server.get("auth") else ""
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    return (f"**Served** at `{server['url']}` as `{model}` (and every other size of the family):\n\n"
            f"```bash\ncurl {server['url']}/chat/completions -H 'Content-Type: application/json'{header} -d '{body}'\n```\n\n"
            f"```python\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=\"{server['url']}\", api_key=\"{key}\")\n"
            f"reply = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])\n"
            f"print(reply.choices[0].message.content)\n```")


# ----------------------------------------------------------------------------- the tab

def reply_pane(label: str, elem_id: str) -> gr.Chatbot:
    """A chat pane that shows each reply's text as the model wrote it: no Markdown, no LaTeX.

    Small sizes write degenerate text ("1. 1. 1. …", "> > > …", "$$$…") whose Markdown or LaTeX parse
    grows much faster than its length; re-parsed at every streamed update, it froze the page (a Stop
    click waited over a minute). Plain text also shows a size's output exactly, markup and all.
    """
    return gr.Chatbot(label=label, elem_id=elem_id, height=360, render_markdown=False, latex_delimiters=[])


def tab(services):
    stop = gr.State(lambda: uuid.uuid4().hex)  # a token: the session's stop event lives in services.stops
    with gr.Row():
        family = gr.Dropdown(chat_family_choices(services), value=None, label="Family", elem_id="chat-family",
                             allow_custom_value=True, info="a distilled family, or a teacher's undistilled sizes")
        # only the sizes the family has; a number typed through the API is checked against the family
        size = gr.Dropdown([], value=None, allow_custom_value=True, label="Size (layers)", elem_id="chat-size")
        ends = gr.Radio(list(ENDS), value="student", label="Ends", elem_id="chat-ends",
                        info="whose embeddings and final norm + head the sizes between student and teacher use "
                             "(auto: the teacher's on the patched side, as the paper's code)")
        size_md = gr.Markdown(elem_id="size-label")
    with gr.Row():
        system = gr.Textbox("", label="System prompt", scale=3)
        # greedy by default: side by side, the same prompt should get each model's most likely answer
        temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
        top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p")
        max_new = gr.Slider(8, 4096, value=128, step=8, label="Max new tokens", elem_id="max-new")
    with gr.Row():
        with gr.Column():
            left = reply_pane("This size", "chat-size-bot")
            left_stats = gr.Markdown(elem_id="size-stats", elem_classes="stats")
        with gr.Column():
            right = reply_pane("Teacher", "chat-teacher-bot")
            right_stats = gr.Markdown(elem_id="teacher-stats", elem_classes="stats")
    message = gr.Textbox(label="Message", placeholder="Ask both at once", elem_id="chat-input")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="send-btn")
        stop_btn = gr.Button("Stop", elem_id="stop-btn")
        regen = gr.Button("Regenerate")
        clear = gr.Button("Clear")
        export_btn = gr.Button("Export this size")
        export_fmt = gr.Dropdown(export_formats(), value="hf", label="Export as", elem_id="export-format")
    export_md = gr.Markdown(elem_id="export-result")
    export_file = gr.File(label="Exported file", elem_id="export-file", interactive=False)
    serve_md = gr.Markdown(elem_id="serve-snippet")
    last = gr.State("")

    def pick_family(student_id):
        sizes = size_choices(services, student_id)
        if sizes is None:
            return gr.update(), ""
        counts, middle = sizes
        return gr.update(choices=counts, value=middle), size_label(services, student_id, middle)

    family.input(safe(pick_family), family, [size, size_md])
    size.change(bind(size_label, services), [family, size, ends], size_md)
    ends.change(bind(size_label, services), [family, size, ends], size_md)
    size.change(bind(serving_snippet, services), [family, size], serve_md)
    turn_inputs = [family, size, message, left, right, system, temperature, top_p, max_new, stop, ends]
    outputs = [left, right, left_stats, right_stats]

    # Send and the message box are off while both replies stream: nothing typed meanwhile is lost
    def locked():
        return gr.update(interactive=False), gr.update(interactive=False)

    def unlocked(text):
        return gr.update(value="", interactive=True), text, gr.update(interactive=True)

    go = send.click(locked, None, [send, message], queue=False, api_name=False).then(
        bind(chat_turn, services), turn_inputs, outputs, api_name="chat")
    sub = message.submit(locked, None, [send, message], queue=False, api_name=False).then(
        bind(chat_turn, services), turn_inputs, outputs, api_name=False)
    for event in (go, sub):
        event.then(unlocked, message, [message, last, send], api_name=False)

    def stop_both(token):
        services.stop_event(token).set()
        return gr.update(interactive=True), gr.update(interactive=True)

    # no `cancels=`: cancelling the turn could land before its last yield and leave "…" on the stats; the
    # stop event ends both generation threads within a token, and the turn then yields its final stats
    stop_btn.click(stop_both, stop, [send, message], queue=False, api_name="stop")

    def drop_last(lhist, rhist, text):
        return lhist[:-2], rhist[:-2], text

    regen.click(drop_last, [left, right, last], [left, right, message]).then(
        bind(chat_turn, services), turn_inputs, outputs)
    clear.click(lambda: ([], [], "", ""), None, outputs)
    export_btn.click(bind(export_chosen, services, refused="Not exported", blank=(None,)),
                     [family, size, ends, export_fmt], [export_md, export_file])
    return family, (pick_family, [family], [size, size_md])
