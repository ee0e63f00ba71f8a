"""What the README promises of the functions it lists, checked against the code: each
signature as the README writes it; each copies out with the helpers its script's "Functions
to copy" list names and runs alone; each raises ValueError on bad input and gives the model
back in the mode it found; no two modules import each other."""
import ast
import contextlib
import importlib
import inspect
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import advtrain
import checkpoints
import common
import data
import fisher
import invert
import models
import transfer
from conftest import ROOT

# The modules of this project (the root's .py files): what "the shared modules" and "no two
# modules import each other" are about.
PROJECT = sorted(p.stem for p in ROOT.glob("*.py"))
# the ones with "Functions to copy"
SCRIPTS = ("advtrain", "fisher", "transfer", "invert", "stats")


# ----------------------------------------------------------------------------- README signatures

def readme_signatures(text):
    """[(module, function, parameters text)] of every signature the README lists: the code span
    that opens a bullet, or follows "; " inside one, `name(params)` or `module.name(params)`;
    an unqualified name belongs to the script of its section ("### advtrain.py: ...")."""
    found, module, bullet = [], None, []

    def flush():
        joined = " ".join(bullet)
        for name, params in re.findall(r"(?:^- |; )`([\w.]+)\((.*?)\)`", joined):
            owner, _, function = name.rpartition(".")
            found.append((owner or module, function, params))
        bullet.clear()

    for line in text.splitlines():
        if line.startswith("#"):
            flush()
            heading = re.match(r"#+ (\w+)\.py\b", line)
            module = heading.group(1) if heading else None
        elif line.startswith("- `"):
            flush()
            bullet.append(line)
        elif bullet and line.startswith("  "):
            bullet.append(line.strip())
        else:
            flush()
    flush()
    return found


def parameters_of(params, namespace):
    """[(name, kind, repr of the default or inspect.Parameter.empty)] of a README parameter
    list, its defaults evaluated in the function's module (so `dtype=torch.float32` compares),
    by repr (so 1 and 1.0 differ)."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    P = inspect.Parameter
    kinds = ([(a, P.POSITIONAL_OR_KEYWORD) for a in args.args]
             + [(a, P.VAR_POSITIONAL) for a in [args.vararg] if a]
             + [(a, P.KEYWORD_ONLY) for a in args.kwonlyargs]
             + [(a, P.VAR_KEYWORD) for a in [args.kwarg] if a])
    defaults = ([None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
                + [None] * bool(args.vararg) + list(args.kw_defaults) + [None] * bool(args.kwarg))
    return [(a.arg, kind, P.empty if d is None
             else repr(eval(ast.unparse(d), dict(vars(namespace)))))
            for (a, kind), d in zip(kinds, defaults)]


SIGNATURES = readme_signatures((ROOT / "README.md").read_text())


def test_the_readme_lists_the_core_functions():
    listed = {(m, f) for m, f, _ in SIGNATURES}
    for expected in [("advtrain", "pgd_attack"), ("advtrain", "accuracy"),
                     ("fisher", "repr_lambda_max"), ("transfer", "linear_probe"),
                     ("invert", "ssim"), ("checkpoints", "load_checkpoint"),
                     ("data", "load_split"), ("common", "mean_se"), ("models", "eval_mode")]:
        assert expected in listed, expected
    assert len(listed) == len(SIGNATURES)  # none listed twice


@pytest.mark.parametrize("module,function,params", SIGNATURES,
                         ids=[f"{m}.{f}" for m, f, _ in SIGNATURES])
def test_readme_signature_is_the_code(module, function, params):
    """The README writes each listed signature exactly: the same parameters, in order, of the
    same kinds, with the same defaults."""
    owner = importlib.import_module(module)
    actual = [(p.name, p.kind, p.default if p.default is p.empty else repr(p.default))
              for p in inspect.signature(getattr(owner, function)).parameters.values()]
    assert parameters_of(params, owner) == actual, f"README: {function}({params})"


# ----------------------------------------------------------------------------- copy-out lists

def copy_lists(script):
    """{function: (same-file helpers, shared module files)} of a script's docstring section
    "Functions to copy", whose entries read `    name: helper, helper; common.py, models.py`
    (`(none)` for no helper; continuation lines indented further)."""
    doc = importlib.import_module(script).__doc__
    section = doc[doc.index("Functions to copy"):].split("\n\n")[0].splitlines()[1:]
    entries = []
    for line in section:
        if re.match(r"^    \w+:", line):
            entries.append(line.strip())
        elif line.startswith("        ") and entries:
            entries[-1] += " " + line.strip()
    lists = {}
    for entry in entries:
        name, _, rest = entry.partition(":")
        helpers, _, shared = rest.partition(";")
        lists[name] = ([h.strip() for h in helpers.split(",") if h.strip() not in ("", "(none)")],
                       [s.strip() for s in shared.split(",") if s.strip()])
    return lists


def top_level(script):
    """(source, {name: the top-level statement defining it}, {name imported from a project
    module: that module}, [the import statements of other modules])."""
    source = (ROOT / f"{script}.py").read_text()
    defined, imported, outside = {}, {}, []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name):
                    defined.setdefault(target.id, node)
        elif isinstance(node, ast.ImportFrom) and node.module in PROJECT:
            imported.update({a.asname or a.name: node.module for a in node.names})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            outside.append(node)
    return source, defined, imported, outside


def names_used(node, obj):
    """The global names a top-level statement refers to: for a function, those of its code
    (nested functions and lambdas included; locals excluded) and of its defaults and
    decorators; for an assignment, those of the statement."""
    if not isinstance(node, ast.FunctionDef):
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    def of_code(code):
        names = set(code.co_names)
        for const in code.co_consts:
            if inspect.iscode(const):
                names |= of_code(const)
        return names

    extra = node.args.defaults + [d for d in node.args.kw_defaults if d] + node.decorator_list
    return of_code(inspect.unwrap(obj).__code__) | {
        n.id for e in extra for n in ast.walk(e) if isinstance(n, ast.Name)}


def needed(script, function):
    """(same-file names, shared modules) that function needs, transitively: what its copy-out
    list must name."""
    _, defined, imported, _ = top_level(script)
    module = importlib.import_module(script)
    helpers, shared, todo = set(), set(), [function]
    while todo:
        name = todo.pop()
        for used in names_used(defined[name], getattr(module, name)):
            if used in imported:
                shared.add(f"{imported[used]}.py")
            elif used in defined and used != function and used not in helpers:
                helpers.add(used)
                todo.append(used)
    return helpers, shared


COPY_LISTS = [(script, function, *lists) for script in SCRIPTS
              for function, lists in copy_lists(script).items()]


def statement_source(source, node):
    """A top-level statement's source, its decorators included."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(source.splitlines()[first - 1:node.end_lineno])


def write_copy(script, function, helpers, shared, folder):
    """folder/copied_<function>.py: the script's imports of other libraries, its imports from
    the listed shared modules, then the listed helpers and the function in file order; the
    listed shared modules copied beside it. Returns the module name."""
    source, defined, imported, outside = top_level(script)
    kept = {node for name, node in defined.items() if name in set(helpers) | {function}}
    lines = [ast.unparse(node) for node in outside]
    shared_modules = {name[:-3] for name in shared}
    for node in ast.parse(source).body:  # the script's own `from <shared> import ...` lines
        if isinstance(node, ast.ImportFrom) and node.module in shared_modules:
            lines.append(ast.unparse(node))
    for node in sorted(kept, key=lambda n: n.lineno):
        lines.append(statement_source(source, node))
    (folder / f"copied_{function}.py").write_text("\n\n\n".join(lines) + "\n")
    for name in shared:
        shutil.copy(ROOT / name, folder / name)
    return f"copied_{function}"


@contextlib.contextmanager
def alone(folder):
    """Imports resolve in folder only, for the project's modules: the repository is off
    sys.path and its modules out of sys.modules (both restored afterwards)."""
    saved_path, saved = list(sys.path), {m: sys.modules.pop(m) for m in PROJECT if m in sys.modules}
    sys.path[:] = [str(folder)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for name in [m for m in sys.modules if m in PROJECT or m.startswith("copied_")]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path


def tiny_setting():
    """A cnn (5 classes, 1 x 8 x 8 images, 64-d features) with non-trivial BatchNorm
    statistics, images x [6, 1, 8, 8] in [0, 1] and labels y [6]."""
    torch.manual_seed(0)
    model = models.build_model("cnn", 5, 1, 8, (0.5,), (0.25,))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    return model.eval(), torch.rand(6, 1, 8, 8, generator=g), torch.arange(6) % 5


def feats_labels():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(20) % 4
    return torch.randn(20, 3, generator=g) + y[:, None], y


# How each listed function runs on small tensors: (mod, model, x, y) -> checked in the test.
RUNS = {
    "pgd_attack": lambda mod, m, x, y: mod.pgd_attack(m, x, y, "l2", 0.5, 2).shape == x.shape,
    "apgd_attack": lambda mod, m, x, y: mod.apgd_attack(m, x, y, "linf", 0.1, 2).shape == x.shape,
    "accuracy": lambda mod, m, x, y: 0 <= mod.accuracy(m, x, y, eps=0.5, steps=2) <= 1,
    "train_epoch": lambda mod, m, x, y: len(mod.train_epoch(
        m, models.make_optimizer(m, 0.01), x, y, batch_size=4, eps=0.5, steps=1)) == 3,
    "fisher_trace_weights": lambda mod, m, x, y: mod.fisher_trace_weights(m, x)[0].shape == (6,),
    "input_fisher_trace": lambda mod, m, x, y: mod.input_fisher_trace(m, x).shape == (6,),
    "input_fisher_lambda_max": lambda mod, m, x, y:
        mod.input_fisher_lambda_max(m, x, 4)[0].shape == (6,),
    "repr_jacobian_frobenius": lambda mod, m, x, y:
        mod.repr_jacobian_frobenius(m, x, 4).shape == (6,),
    "repr_lambda_max": lambda mod, m, x, y: mod.repr_lambda_max(m, x, 4)[0].shape == (6,),
    "extract_features": lambda mod, m, x, y: mod.extract_features(m, x, 1, 8).shape == (6, 64),
    "linear_probe": lambda mod, m, x, y: 0 <= mod.linear_probe(
        *feats_labels(), *feats_labels())["acc"] <= 1,
    "few_shot_probe": lambda mod, m, x, y: 0 <= mod.few_shot_probe(
        *feats_labels(), *feats_labels(), 2, draws=2)["acc"] <= 1,
    "finetune": lambda mod, m, x, y: 0 <= mod.finetune(m, x, y, (x, y), 1, 8, epochs=1)["acc"] <= 1,
    "invert_features": lambda mod, m, x, y: mod.invert_features(
        m, m.features(x).detach(), torch.full_like(x, 0.5), 2).shape == x.shape,
    "ssim": lambda mod, m, x, y: mod.ssim(torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12)
                                          ).shape == (2,),
    "psnr": lambda mod, m, x, y: mod.psnr(x, x.flip(0)).shape == (6,),
    # stats.py: numbers, no model
    "one_sided_t": lambda mod, m, x, y: 0 < mod.one_sided_t([0.2, 0.5, 0.3], +1)["p"] < 0.05,
    "holm": lambda mod, m, x, y: mod.holm([0.01, 0.04]) == [0.02, 0.04],
    "slope": lambda mod, m, x, y: mod.slope([0, 1, 2], [1, 3, 5]) == 2.0,
    "kendall_test": lambda mod, m, x, y: mod.kendall_test([1, 2, 3, 4], +1)["p"] == 1 / 24,
    "sen_slope": lambda mod, m, x, y: mod.sen_slope([0, 1, 2, 3], [0, 2, 4, 6])[0] == 2.0,
    "example_test": lambda mod, m, x, y: mod.example_test([1, 1, 0], [0, 1, 0], +1)["p"] == 0.5,
    "mde_t": lambda mod, m, x, y: 3.9 < mod.mde_t(1.0, 2) < 4.1,
    "kendall_mde": lambda mod, m, x, y: mod.kendall_mde([0, 1, 2, 3, 4], 1.0) > 0,
}


def test_every_listed_function_is_in_the_readme_and_runs_here():
    listed = {f for _, f, _, _ in COPY_LISTS}
    readme = {f for m, f, _ in SIGNATURES if m in SCRIPTS}
    assert listed == readme == set(RUNS)


@pytest.mark.parametrize("script,function,helpers,shared", COPY_LISTS,
                         ids=[f"{s}.{f}" for s, f, _, _ in COPY_LISTS])
def test_copy_list_is_what_the_function_needs(script, function, helpers, shared):
    """The list names every helper the function needs, transitively, and no other; and the
    shared modules those come from."""
    assert (set(helpers), set(shared)) == needed(script, function)
    assert set(shared) <= {"common.py", "data.py", "models.py"}  # the shared modules
    assert script != "stats" or not shared  # numpy and the standard library only


@pytest.mark.parametrize("script,function,helpers,shared", COPY_LISTS,
                         ids=[f"{s}.{f}" for s, f, _, _ in COPY_LISTS])
def test_function_copied_with_its_list_imports_alone_and_runs(script, function, helpers, shared,
                                                              tmp_path):
    """Copied into an empty folder with exactly its listed helpers and shared modules, the
    function imports without the rest of the project and runs on small tensors."""
    name = write_copy(script, function, helpers, shared, tmp_path)
    model, x, y = tiny_setting()
    with alone(tmp_path):
        mod = importlib.import_module(name)
        assert mod.__file__ == str(tmp_path / f"{name}.py")
        assert RUNS[function](mod, model, x, y)
        loaded = {m: sys.modules[m].__file__ for m in PROJECT if m in sys.modules}
    assert loaded == {m[:-3]: str(tmp_path / m) for m in shared}


# ----------------------------------------------------------------------------- imports

def project_imports(module):
    """The project modules a module imports anywhere in its file (deferred imports included)."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT) - {module}


@pytest.mark.parametrize("script", ["advtrain", "fisher", "transfer", "invert"])
def test_each_script_imports_with_only_the_shared_modules(script, tmp_path):
    """A script copied beside the shared modules alone imports: no script imports another."""
    for name in ("checkpoints.py", "common.py", "data.py", "models.py", "published.py",
                 f"{script}.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    with alone(tmp_path):
        assert importlib.import_module(script).__file__ == str(tmp_path / f"{script}.py")


def test_no_import_cycle():
    """The import graph of the project's modules (every import statement, deferred ones
    included) has no cycle: no two modules import each other, directly or around a circle;
    the shared modules import no other module of the project but common.py."""
    graph = {m: project_imports(m) for m in PROJECT}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(path + [module])
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, path + [module])
        state[module] = "done"

    for module in PROJECT:
        visit(module, [])
    assert {m: graph[m] for m in ("common", "models", "data")} == {
        "common": set(), "models": set(), "data": {"common"}}
    assert "checkpoints" in graph["fisher"] and "models" in graph["checkpoints"]
    assert all("checkpoints" not in graph[m] for m in ("models", "published", "data"))
    assert graph["stats"] == set() and graph["claims"] == {"stats"}


# ----------------------------------------------------------------------------- modes

def bn_modes(model):
    """A recorder of the training flag of every BatchNorm the model runs: list of bools."""
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    return seen


def forward_in(context, model, x):
    """model(x) inside a mode context manager (models.eval_mode, models.train_mode)."""
    with context(model):
        model(x)


EVAL, TRAINS = {False}, {False, True}  # the modes a function's BatchNorm layers run in
# Every README-listed function that takes a model: how to call it on (model, x, y), the modes
# its BatchNorm layers run in (train_epoch attacks in eval mode and steps in train mode;
# finetune trains a copy, whose layers carry the recorder too), and whether it leaves the
# BatchNorm statistics as they were (all but train_epoch).
MODEL_CALLS = {
    "pgd_attack": (lambda m, x, y: advtrain.pgd_attack(m, x, y, "l2", 0.5, 2), EVAL, True),
    "apgd_attack": (lambda m, x, y: advtrain.apgd_attack(m, x, y, "linf", 0.1, 2), EVAL, True),
    "accuracy": (lambda m, x, y: advtrain.accuracy(m, x, y, 4, "l2", 0.5, steps=2), EVAL, True),
    "accuracy-clean": (lambda m, x, y: advtrain.accuracy(m, x, y, 4), EVAL, True),
    "accuracy-apgd": (lambda m, x, y: advtrain.accuracy(m, x, y, 4, "linf", 0.1, steps=2,
                                                        attack="apgd"), EVAL, True),
    "train_epoch": (lambda m, x, y: advtrain.train_epoch(
        m, models.make_optimizer(m, 0.01), x, y, batch_size=4, eps=0.5, steps=1), TRAINS, False),
    "fisher_trace_weights": (lambda m, x, y: fisher.fisher_trace_weights(m, x, chunk=4), EVAL,
                             True),
    "input_fisher_trace": (lambda m, x, y: fisher.input_fisher_trace(m, x), EVAL, True),
    "input_fisher_lambda_max": (lambda m, x, y: fisher.input_fisher_lambda_max(m, x, 4), EVAL,
                                True),
    "repr_jacobian_frobenius": (lambda m, x, y: fisher.repr_jacobian_frobenius(m, x, 4), EVAL,
                                True),
    "repr_lambda_max": (lambda m, x, y: fisher.repr_lambda_max(m, x, 4), EVAL, True),
    "extract_features": (lambda m, x, y: transfer.extract_features(m, x, 1, 8, 4), EVAL, True),
    "finetune": (lambda m, x, y: transfer.finetune(m, x, y, (x, y), 1, 8, epochs=1), TRAINS,
                 True),
    "invert_features": (lambda m, x, y: invert.invert_features(
        m, torch.rand(len(x), 64), torch.full_like(x, 0.5), 2), EVAL, True),
    "eval_mode": (lambda m, x, y: forward_in(models.eval_mode, m, x), EVAL, True),
    "train_mode": (lambda m, x, y: forward_in(models.train_mode, m, x), {True}, False),
}


def set_modes(model, start):
    """start: "eval", "train", or "mixed" (train, one BatchNorm in eval)."""
    model.train(start != "eval")
    if start == "mixed":
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()


@pytest.mark.parametrize("start", ["eval", "train", "mixed"])
@pytest.mark.parametrize("call", sorted(MODEL_CALLS))
def test_mode_given_back(call, start):
    """Each function that takes a model leaves every submodule in the mode it found it, runs
    its BatchNorm layers in the modes it should (eval mode but for training), and leaves their
    statistics untouched unless it trains the model itself."""
    model, x, y = tiny_setting()
    set_modes(model, start)
    before = {name: m.training for name, m in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    seen = bn_modes(model)
    run, bn_modes_expected, keeps_statistics = MODEL_CALLS[call]
    run(model, x, y)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert set(seen) == bn_modes_expected, seen
    kept = all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert kept == keeps_statistics


# ----------------------------------------------------------------------------- bad input

def bad_inputs():
    """(function, call on (model, x, y), what the message names): one or more wrong shapes or
    values per README-listed function."""
    f3, y3 = feats_labels()
    return [
        ("pgd_attack", lambda m, x, y: advtrain.pgd_attack(m, x[0], y, "l2", 0.5, 2), "x must"),
        ("pgd_attack", lambda m, x, y: advtrain.pgd_attack(m, x * 2 - 1, y, "l2", 0.5, 2),
         "values in [0, 1]"),
        ("pgd_attack", lambda m, x, y: advtrain.pgd_attack(m, x, y[:3], "l2", 0.5, 2), "y must"),
        ("pgd_attack", lambda m, x, y: advtrain.pgd_attack(m, x, y, "l1", 0.5, 2), "'l1'"),
        ("pgd_attack", lambda m, x, y: advtrain.pgd_attack(m, x, y, "l2", -0.5, 2), "eps"),
        ("pgd_attack", lambda m, x, y: advtrain.pgd_attack(m, x, y, "l2", 0.5, 0), "steps 0"),
        ("apgd_attack", lambda m, x, y: advtrain.apgd_attack(m, x, y, "linf", 0.1, 2,
                                                             restarts=0), "restarts"),
        ("apgd_attack", lambda m, x, y: advtrain.apgd_attack(m, x, y, "linf", 0.1, 2,
                                                             targets=5), "targets 5"),
        ("accuracy", lambda m, x, y: advtrain.accuracy(m, x, y, eps=0.5), "needs steps"),
        ("accuracy", lambda m, x, y: advtrain.accuracy(m, x, y, attack="cw"), "'cw'"),
        ("accuracy", lambda m, x, y: advtrain.accuracy(m, x, y, batch_size=0), "batch_size"),
        ("train_epoch", lambda m, x, y: advtrain.train_epoch(
            m, models.make_optimizer(m, 0.01), x[:, 0], y, eps=0.5), "x must"),
        ("fisher_trace_weights", lambda m, x, y: fisher.fisher_trace_weights(m, x[0]), "x must"),
        ("fisher_trace_weights", lambda m, x, y: fisher.fisher_trace_weights(m, x, y - 1),
         "labels 0-4"),
        ("fisher_trace_weights", lambda m, x, y: fisher.fisher_trace_weights(
            m, x, y, label_samples=2), "not both"),
        ("input_fisher_trace", lambda m, x, y: fisher.input_fisher_trace(m, x[0]), "x must"),
        ("input_fisher_trace", lambda m, x, y: fisher.input_fisher_trace(m, x, 0),
         "label_samples"),
        ("input_fisher_lambda_max", lambda m, x, y: fisher.input_fisher_lambda_max(m, x, tol=0),
         "tol"),
        ("repr_jacobian_frobenius", lambda m, x, y: fisher.repr_jacobian_frobenius(m, x, 0),
         "probes"),
        ("repr_lambda_max", lambda m, x, y: fisher.repr_lambda_max(m, x * 255), "values in"),
        ("extract_features", lambda m, x, y: transfer.extract_features(m, x[0], 1, 8), "split"),
        ("extract_features", lambda m, x, y: transfer.extract_features(m, x, 1, 8, 0),
         "batch_size"),
        ("linear_probe", lambda m, x, y: transfer.linear_probe(f3[:, :2], y3, f3, y3),
         "same width"),
        ("linear_probe", lambda m, x, y: transfer.linear_probe(f3, y3[:5], f3, y3),
         "train_labels"),
        ("linear_probe", lambda m, x, y: transfer.linear_probe(f3, y3, f3, y3, l2_grid=()),
         "l2_grid"),
        ("linear_probe", lambda m, x, y: transfer.linear_probe(f3, y3, f3, y3, val_fraction=1.0),
         "val_fraction"),
        ("few_shot_probe", lambda m, x, y: transfer.few_shot_probe(f3, y3, f3, y3, 6), "shots"),
        ("finetune", lambda m, x, y: transfer.finetune(m, x[0], y, (x, y), 1, 8), "x must"),
        ("finetune", lambda m, x, y: transfer.finetune(m, x, y, (x, y), 1, 8, epochs=0),
         "epochs"),
        ("invert_features", lambda m, x, y: invert.invert_features(
            m, m.features(x)[:3].detach(), x, 2), "z0 must"),
        ("invert_features", lambda m, x, y: invert.invert_features(
            m, m.features(x).detach(), x, 2, noise_std=-1.0), "noise_std"),
        ("ssim", lambda m, x, y: invert.ssim(x, x), "at least size x size"),
        ("ssim", lambda m, x, y: invert.ssim(x, x, size=3, sigma=0), "sigma"),
        ("psnr", lambda m, x, y: invert.psnr(x, x[:3]), "same shape"),
        ("psnr", lambda m, x, y: invert.psnr(x, x, data_range=0), "data_range"),
        ("build_model", lambda m, x, y: models.build_model("vgg", 5, 1, 8, (0.5,), (0.2,)),
         "unknown arch"),
        ("adapt_classifier", lambda m, x, y: models.adapt_classifier(m.body, head="nope"),
         "no module 'nope'"),
        ("load_split", lambda m, x, y: data.load_split("fashion-mnist", False, classes=[3, 12],
                                                       download=False), "out of range"),
        ("load_split", lambda m, x, y: data.load_split("nope", False), "unknown dataset"),
        ("load_checkpoint", lambda m, x, y: checkpoints.load_checkpoint(
            ROOT / "README.md"), "cannot read checkpoint"),
        ("mean_se", lambda m, x, y: common.mean_se(["a"]), "could not convert"),
    ]


BAD_INPUTS = bad_inputs()


def test_every_listed_function_has_a_bad_input_test():
    listed = {f for m, f, _ in SIGNATURES if m != "report" and m != "stats"}
    covered = {(case.values if hasattr(case, "values") else case)[0] for case in BAD_INPUTS}
    assert listed - {"eval_mode"} <= covered, listed - covered


@pytest.mark.parametrize("function,call,names", BAD_INPUTS,
                         ids=[f"{case.values[0] if hasattr(case, 'values') else case[0]}-{i}"
                              for i, case in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_value_error_naming_it(function, call, names):
    """A wrong shape or value is a one-line ValueError (the library's error; main turns it
    into one line and exit 2) that names what is wrong, and the model's mode is given back."""
    model, x, y = tiny_setting()
    model.train()
    with pytest.raises(ValueError) as info:
        call(model, x, y)
    message = str(info.value)
    assert "\n" not in message and names in message, message
    assert not isinstance(info.value, common.UserError)
    assert all(m.training for m in model.modules())


def test_missing_files_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="--no-download"):
        data.load_split("mnist", False, data_dir=str(tmp_path), download=False)


def test_main_turns_library_errors_into_one_line_and_exit_2(capsys):
    for error in (ValueError("bad value\nsecond line"), FileNotFoundError("no file"),
                  common.UserError("bad flag")):
        with pytest.raises(SystemExit) as info, common.user_errors():
            raise error
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {str(error).splitlines()[0]}\n"
    with pytest.raises(KeyError), common.user_errors():  # a bug keeps its traceback
        raise KeyError("bug")


# ----------------------------------------------------------------------------- accuracy

def test_accuracy_at_eps_is_never_the_clean_accuracy_by_default():
    """accuracy(model, x, y, eps=0.5) once returned the clean accuracy (its default steps=0
    attacked nothing): robust accuracy needs steps, and with them it is an attack's."""
    model, x, y = tiny_setting()
    with pytest.raises(ValueError, match="needs steps"):
        advtrain.accuracy(model, x, y, eps=0.5)
    with pytest.raises(ValueError, match="steps 0 attacks nothing"):
        advtrain.accuracy(model, x, y, eps=0.5, steps=0)
    clean = advtrain.accuracy(model, x, y)
    assert clean == advtrain.accuracy(model, x, y, steps=10)  # eps 0: steps are not used
    logits = model(x).detach()
    y = logits.argmax(1)  # every example right: the attack has something to take
    assert advtrain.accuracy(model, x, y) == 1.0
    assert advtrain.accuracy(model, x, y, eps=2.0, steps=10) < 1.0


def test_statistics_import_only_numpy_and_the_standard_library():
    """stats.py copies into any project: numpy and the standard library only."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "stats.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"numpy", *sys.stdlib_module_names}, imported
