"""The seams between library, jobs, database and dashboard: who may import whom, one device per run,
loss terms by name from the loop to the chart, and job kinds as one registry."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from sqlmodel import Session

from boomerang.errors import BoomerangError
from boomerang.settings import Settings
from db import crud
from db.engine import make_engine
from db.models import JobCreate
from tiny import save_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
TEXT = "One device for the whole run: teacher, student, every batch, and the family after. " * 60


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import statement of a file, function-local ones included; relative imports
    are not used here."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def files(folder: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


PACKAGES = ("boomerang", "db", "workers", "app", "serve")


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of the project's packages -> the project modules it imports (anywhere in the file).

    `from boomerang.evaluation import chart` names the module boomerang.evaluation.chart; `from x.y import z`
    where z is a name in x.y names x.y."""
    modules = {}
    for folder in PACKAGES:
        for path in files(folder, root):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for module, names in imports_of(path):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                while target and target not in modules:  # the deepest project module the name is in
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): each holds at least one import circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


FORBIDDEN = {
    "boomerang": ("db", "workers", "app", "serve", "gradio", "celery", "sqlmodel", "sqlalchemy", "redis", "fastapi",
                  "uvicorn"),
    "db": ("workers", "app", "serve", "gradio", "celery"),
    "workers": ("app", "serve", "gradio", "boomerang.cli"),
    "app": ("workers.cli", "workers.app", "workers.runner", "workers.bodies", "workers.context", "serve",
            "boomerang.cli"),
    "serve": ("app", "workers", "gradio", "celery", "boomerang.cli"),
    "bench": ("app", "workers", "db"),
}


def layer_violations(root: Path = ROOT) -> list[str]:
    """Imports that break docs/architecture.md's table: direct ones of any module, and for the project's own
    layers also the ones reached through other modules (app -> workers.submit -> ... -> workers.bodies)."""
    graph = module_graph(root)

    def hit(module: str, folder: str) -> bool:
        return any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder])

    bad = []
    for folder in FORBIDDEN:
        for path in files(folder, root):
            bad += [f"{path.relative_to(root)} imports {m}" for m, _ in imports_of(path) if hit(m, folder)]
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name in graph:
                bad += [f"{path.relative_to(root)} reaches {m}" for m in sorted(reachable(graph, name))
                        if hit(m, folder) and m not in {i for i, _ in imports_of(path)}]
    return bad


def test_each_folder_imports_only_what_the_architecture_allows():
    """docs/architecture.md's table, enforced: a layer never imports the layers above it, not even through
    another module."""
    bad = layer_violations()
    assert not bad, "\n".join(bad)


def test_no_import_circle_between_modules_function_local_imports_included():
    found = circles(module_graph())
    assert not found, "import circles among: " + "; ".join(" <-> ".join(group) for group in found)


def test_no_private_name_is_imported_across_modules():
    bad = []
    for folder in ("boomerang", "db", "workers", "app", "serve", "bench", "tests"):
        for path in files(folder):
            for module, names in imports_of(path):
                if module.split(".")[0] in ("boomerang", "db", "workers", "app", "serve"):
                    bad += [f"{path.relative_to(ROOT)}: from {module} import {n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_the_import_checks_catch_a_planted_circle_and_a_layer_broken_through_another_module(tmp_path):
    """The checks above can fail: a planted tree with a circle made of function-local imports, and a dashboard
    module that reaches the job bodies only through a module it may import."""
    plant = {
        "boomerang/__init__.py": "",
        "boomerang/a.py": "def f():\n    from boomerang import b\n",
        "boomerang/b.py": "def g():\n    from boomerang.a import f\n",
        "workers/__init__.py": "",
        "workers/submit.py": "import workers.kinds\n",
        "workers/kinds.py": "from workers import bodies\n",
        "workers/bodies.py": "",
        "app/__init__.py": "",
        "app/launch.py": "from workers.submit import submit\nfrom db import crud\n",
    }
    for name, text in plant.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for folder in ("db", "serve", "bench"):
        (tmp_path / folder).mkdir(exist_ok=True)
    assert circles(module_graph(tmp_path)) == [["boomerang.a", "boomerang.b"]]
    assert layer_violations(tmp_path) == ["app/launch.py reaches workers.bodies"]
    assert imports_of(tmp_path / "app/launch.py") == [("workers.submit", ["submit"]), ("db", ["crud"])]


# ----------------------------------------------------------------------------- one device per run


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOMERANG_HOME", str(tmp_path / "home"))
    save_tiny_teacher(tmp_path / "teacher", "llama")
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tmp_path


def queued(engine, tmp: Path, **settings) -> int:
    """A distillation job row as submit writes it (validated by the registry), without a queue."""
    from workers.submit import validate

    base = dict(teacher=str(tmp / "teacher"), data=str(tmp / "corpus.txt"), steps=3, batch_size=2, seq_len=16, lr=1e-3,
                checkpoint_every=2)
    clean = validate("distill", {**base, **settings})
    with Session(engine) as s:
        return crud.create_job(session=s, job_in=JobCreate(kind="distill", settings=clean)).id


@pytest.mark.parametrize("device", devices())
def test_a_job_through_the_real_runner_keeps_teacher_student_batches_and_family_on_one_device(home, device, monkeypatch):
    from boomerang import family as family_module
    from boomerang.training import loop
    from workers.runner import run_job

    seen = []
    real_loss_step, real_init = loop.loss_step, family_module.Family.__init__

    def spy_loss_step(run, ids, patched=frozenset()):
        seen.append(("batch", ids.device.type))
        seen.append(("teacher", next(run.teacher.model.parameters()).device.type))
        seen.append(("student", next(run.student.parameters()).device.type))
        return real_loss_step(run, ids, patched)

    def spy_family(self, teacher, student, plan, order="last", ends="student"):
        seen.append(("family teacher", next(teacher.parameters()).device.type))
        seen.append(("family student", next(student.parameters()).device.type))
        real_init(self, teacher, student, plan, order, ends)

    monkeypatch.setattr(loop, "loss_step", spy_loss_step)
    monkeypatch.setattr(family_module.Family, "__init__", spy_family)
    engine = make_engine(f"sqlite:///{home / 'jobs.db'}")
    job_id = queued(engine, home, device=device, mix_prob=0.5)
    assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
    kinds = {what for what, _ in seen}
    assert {"batch", "teacher", "student", "family teacher", "family student"} <= kinds
    assert {where for _, where in seen} == {device}, seen
    with Session(engine) as s:
        (student,) = crud.list_students(session=s)
        assert [z.n_layers for z in crud.sizes_of(session=s, student_id=student.id)] == [5, 6, 7, 8]


# ----------------------------------------------------------------------------- loss terms by name


def test_a_new_loss_term_reaches_metrics_the_database_the_log_and_the_chart(home, monkeypatch):
    """Adding a term is a row of TERMS: here one is added in the test and followed to the Jobs chart."""
    from app.jobs import job_detail, loss_figure
    from boomerang.training import terms
    from workers.runner import run_job

    probe = terms.Term("kl_weight", frozenset({"student"}), lambda x: x.student_logits.float().pow(2).mean() * 0 + 0.125)
    monkeypatch.setitem(terms.TERMS, "probe", probe)
    engine = make_engine(f"sqlite:///{home / 'jobs.db'}")
    job_id = queued(engine, home, ce_weight=0, cosine_weight=0)
    assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
    with Session(engine) as s:
        job = crud.get_job(session=s, job_id=job_id)
        rows = crud.steps_of(session=s, job_id=job_id)
    assert [r.step for r in rows] == [1, 2, 3]
    assert all(set(r.terms) == {"kl", "probe"} and r.terms["probe"] == 0.125 for r in rows)
    assert all(r.loss == pytest.approx(0.1 * (r.terms["kl"] + 0.125)) for r in rows)  # weighted like kl
    assert job.losses["probe"] == 0.125 and "probe 0.1250" in job.log
    metrics = [json.loads(line) for line in (Path(job.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["terms"]["probe"] for m in metrics] == [0.125] * 3
    services = type("S", (), {"engine": engine})()
    _, curves, _ = job_detail(services, job_id)
    assert {c["term"] for c in curves} == {"total", "kl", "probe"}
    assert [t.name for t in loss_figure(curves).data] == ["total", "kl", "probe"]


# ----------------------------------------------------------------------------- job kinds


def test_every_job_kind_has_one_registry_row_and_its_request_round_trips(tmp_path):
    from boomerang.evaluation.run import EvalRequest
    from boomerang.export import ExportRequest
    from boomerang.training.parallel import NodeShare
    from boomerang.training.recipe import DistillConfig
    from workers.bodies import BODIES
    from workers.kinds import KINDS, build_request

    assert set(KINDS) == set(BODIES) == {"distill", "eval", "export", "node"}
    assert len({k.task for k in KINDS.values()}) == len(KINDS)
    samples = {"distill": DistillConfig(), "export": ExportRequest(str(tmp_path), 5, str(tmp_path / "x")),
               "eval": EvalRequest(str(tmp_path), cost=True, parts=3),
               "node": NodeShare(DistillConfig(nnodes=2, node_queues=["b"]), 1, "10.0.0.1:29500", resume=True)}
    for kind, request in samples.items():
        assert isinstance(request, KINDS[kind].request)
        again = build_request(kind, json.loads(json.dumps(request.to_dict())))  # what a job row holds
        assert again == request


@dataclasses.dataclass
class EchoRequest(Settings):
    """A job kind planted by a test: what a new kind is (a request class, a body, a registry row)."""

    text: str
    """What to echo."""
    times: int = 1
    """How many times."""

    def __post_init__(self):
        self.check_types()

    def check(self) -> None:
        pass


def test_a_new_job_kind_is_a_registry_row_a_body_and_a_request_class(home, monkeypatch):
    """No migration, no CLI table, no dashboard change: submit, the runner, the job row, `boomerang submit KIND`
    and the dashboard's wording all follow the registry."""
    from app.jobs import jobs_table, progress_text
    from boomerang.cli import build_parser
    from workers.bodies import BODIES
    from workers.context import Outcome
    from workers.kinds import KINDS, JobType
    from workers.runner import run_job
    from workers.submit import validate

    def echo(ctx, request):
        ctx.progress(request.times, request.times, force=True)
        return Outcome({"echo": request.text * request.times})

    monkeypatch.setitem(KINDS, "echo", JobType(EchoRequest, "boomerang.echo", "queue an echo", unit="word"))
    monkeypatch.setitem(BODIES, "echo", echo)
    engine = make_engine(f"sqlite:///{home / 'jobs.db'}")
    with Session(engine) as s:
        job_id = crud.create_job(session=s, job_in=JobCreate(kind="echo", settings=validate("echo", {"text": "hi",
                                                                                                    "times": 2}))).id
    assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
    with Session(engine) as s:
        job = crud.get_job(session=s, job_id=job_id)
    assert (job.kind, job.result, job.step, job.total) == ("echo", {"echo": "hihi"}, 2, 2)
    assert progress_text(job.kind, job.step, job.total, None) == "word 2/2"
    services = type("S", (), {"engine": engine})()
    assert [row[1:4] for row in jobs_table(services)] == [["echo", "SUCCEEDED", "2/2"]]
    args = build_parser().parse_args(["submit", "echo", "--text", "ho", "--times", "3", "--queue", "q"])
    assert (args.kind, args.build(args), args.queue) == ("echo", EchoRequest("ho", 3), "q")
    with pytest.raises(BoomerangError, match="no job kind 'nope': one of distill, eval, export, node, echo"):
        validate("nope", {})


@pytest.mark.parametrize("kind, settings, message", [
    ("distill", {"steps": "ten"}, 'steps must be an integer, got "ten"'),
    ("distill", {"lr": float("inf")}, "lr must be a finite number, got inf"),
    ("distill", {"stepz": 1}, r"unknown keys \['stepz'\]"),
    ("eval", {"student": "s", "tasks": "quiz"}, 'tasks must be a list of strings, got "quiz"'),
    ("eval", {"student": "s", "settings": {"limit": 0}, "cost": True}, "limit must be at least 1"),
    ("eval", {"student": "s"}, "nothing to evaluate"),
    ("export", {"student": "s", "layers": 0, "out": "o"}, "layers must be at least 1"),
    ("export", {"student": "s", "layers": 5}, "missing out"),
])
def test_requests_refuse_bad_settings_with_the_setting_named(kind, settings, message):
    from boomerang.errors import BoomerangError
    from workers.kinds import build_request

    with pytest.raises(BoomerangError, match=message):
        build_request(kind, settings)


def test_a_relative_teacher_path_is_one_teacher_everywhere(home, monkeypatch):
    """Typed as ./teacher in one place and found as /abs/teacher in another, it is still one teacher row."""
    from workers.runner import run_job

    monkeypatch.chdir(home)
    engine = make_engine(f"sqlite:///{home / 'jobs.db'}")
    from workers.submit import validate

    clean = validate("distill", dict(teacher="./teacher", data="corpus.txt", steps=1, batch_size=2, seq_len=16))
    assert clean["teacher"] == str(home / "teacher")
    with Session(engine) as s:
        job_id = crud.create_job(session=s, job_in=JobCreate(kind="distill", settings=clean),
                                 teacher_id=crud.get_or_create_teacher(session=s, source=clean["teacher"]).id).id
    assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
    with Session(engine) as s:
        assert [t.source for t in crud.list_teachers(session=s)] == [str(home / "teacher")]


def test_a_jobs_phases_before_its_first_step_reach_the_database(home, monkeypatch):
    """Loading the teacher, writing its corpus, measuring layer importance: each shows n/N and an ETA first."""
    from workers.runner import run_job

    seen = []
    real = crud.update_progress

    def spy(*, session, job_id, **fields):
        if "phase" in fields:
            seen.append(fields["phase"])
        return real(session=session, job_id=job_id, **fields)

    monkeypatch.setattr(crud, "update_progress", spy)
    engine = make_engine(f"sqlite:///{home / 'jobs.db'}")
    job_id = queued(engine, home, data="teacher", teacher_docs=4, plan="importance")
    assert run_job(job_id, engine=engine, worker="test") == "SUCCEEDED"
    names = [p.split(":")[0] for p in seen]
    order = list(dict.fromkeys(names))
    assert order[:4] == ["loading the teacher", "writing the teacher's corpus", "measuring layer importance",
                         "training"], order
    corpus = [p for p in seen if p.startswith("writing the teacher's corpus")]
    assert corpus[0].startswith("writing the teacher's corpus: 0/768 tokens")  # 4 x 192 decode slots
    assert corpus[-1].startswith("writing the teacher's corpus: 768/768 tokens")
    assert any(p.startswith("measuring layer importance: 8/8 layers") and "ETA" in p for p in seen)
    with Session(engine) as s:
        assert crud.get_job(session=s, job_id=job_id).phase is None  # a finished job is in no phase
