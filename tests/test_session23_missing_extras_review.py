"""Review H74: crossent with its OPTIONAL dependencies absent (a ``pip install crossent`` or
``pip install 'crossent[cli]'`` without torch, and so on).

What was reviewed: ``import crossent`` and every core, teaching and training module with torch,
JAX, SciPy, scikit-learn, matplotlib, typer, rich, transformers and triton each missing and all
missing together (nothing optional may be imported, or even looked for); every core function on
NumPy with all of them missing (same bits as with them installed, and the values of the
independent references: SciPy, scikit-learn, torch in float64, computed in this process);
``python -m crossent``; ``crossent.torch``, ``crossent.torch.distributed``,
``crossent.integrations.transformers``, ``crossent.training`` and ``crossent.teaching`` with
their extras missing; the ``crossent`` command (every subcommand, ``--help``/``--version``,
``python -m crossent.cli``, ``python -m crossent.torch.bench``) with typer, rich, matplotlib,
scikit-learn or torch missing, against the README's table (one line on stderr naming the extra,
exit code 1, no traceback, nothing written); triton missing: ``backend="triton"`` refused
naming it, ``backend="auto"``/``"rowblock"`` on CPU tensors still torch's numbers.

How absence is simulated: each check runs in a subprocess whose import system cannot see the
named top-level packages (every finder on ``sys.meta_path`` is wrapped to return no spec for
them, so ``import torch`` raises ``ModuleNotFoundError('No module named ...', name='torch')``
and ``importlib.util.find_spec`` returns None, as when the package is not installed). The
wrapper also records every lookup of a hidden package. This process is unaffected. The
subprocesses are started together when the first test asks for one (a few at a time), so the
file takes about as long as its slowest few.

Bugs are strict xfails: ``@pytest.mark.xfail(strict=True, reason="BUG H74-n: ...")``, each
written as the test should pass. Everything else is a regression guard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

OPTIONAL = ("torch", "jax", "jaxlib", "scipy", "sklearn", "matplotlib", "typer", "rich", "click",
            "transformers", "triton", "optax", "array_api_strict", "ml_dtypes", "accelerate")
"""Every package crossent's extras (and its test extra) bring: none is a core dependency."""

CORE_ONLY = ",".join(OPTIONAL)
TORCH_ONLY = "jax,jaxlib,scipy,sklearn,matplotlib,typer,rich,transformers,triton,optax"
"""``pip install 'crossent[torch]'``: numpy, array-api-compat and torch."""
CLI_NO_TORCH = "torch,jax,jaxlib,transformers,triton,optax,array_api_strict,accelerate"
"""``pip install 'crossent[cli]'``: typer, rich, matplotlib, scikit-learn (and SciPy, which
scikit-learn needs), no torch, no JAX."""

PRELUDE = '''\
import atexit as _atexit, json as _json, os as _os, sys as _sys
BLOCKED = set(filter(None, _os.environ.get("H74_BLOCK", "").split(",")))
TRIED = []


class _Hidden:
    """A finder that cannot see the BLOCKED top-level packages (as if not installed)."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            TRIED.append(name)
            return None
        find = getattr(self._finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def invalidate_caches(self):
        getattr(self._finder, "invalidate_caches", lambda: None)()

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


assert not [m for m in _sys.modules if m.partition(".")[0] in BLOCKED], "imported already"
_sys.meta_path[:] = [_Hidden(f) for f in _sys.meta_path]
'''

CLI = "from crossent.cli import main\nmain()\n"
FAST_BENCH = ("import crossent.torch.bench as bench\n"
              "bench.contenders = lambda *a, **k: ['eager', 'crossent']  # no torch.compile\n")
QUICK_TOUR = ("import dataclasses\nimport crossent.training as tr\n"
              "tr.TOUR_CONFIG = dataclasses.replace(tr.TOUR_CONFIG, model='softmax', epochs=1)"
              "  # the tour's training section in a second\n")
BENCH_ARGS = ("ce-small", "--quick", "--no-memory", "--repeats", "1", "--warmup", "0")

CORE_INPUTS = '''\
import numpy as np
rng = np.random.default_rng(20260741)
z = rng.normal(size=(4, 5)) * 3
y = np.array([0, 3, -100, 4])
w = np.array([1.0, 0.5, 2.0, 1.5, 0.25])
e = np.exp(rng.normal(size=(2, 4, 5)))
p, q = e[0] / e[0].sum(-1, keepdims=True), e[1] / e[1].sum(-1, keepdims=True)
pr = rng.uniform(0.05, 0.95, size=6)
t = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
zb = rng.normal(size=(4, 3)) * 2
tb = (rng.uniform(size=(4, 3)) > 0.5) * 1.0
'''

CORE_PROBE = CORE_INPUTS + '''\
import hashlib
import crossent as xe
from crossent import teaching, training as tr
from crossent.teaching import article, curves

out, errors = {}, {}


def put(key, value):
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            put(f"{key}.{i}", v)
        return
    out[key] = [float(v).hex() for v in np.asarray(value, dtype=np.float64).ravel()]


def refused(key, fn):
    try:
        fn()
    except Exception as err:
        errors[key] = [type(err).__name__, str(err)]
    else:
        errors[key] = ["no error", ""]


put("surprisal", xe.surprisal(0.001, base=2))
put("entropy", xe.entropy(p, base=2))
put("cross_entropy", xe.cross_entropy(p, q))
put("kl_divergence", xe.kl_divergence(p, q))
put("kl_terms", xe.kl_divergence_terms(p, q, base=10))
put("generalized_kl", xe.generalized_kl_divergence(2 * p, q))
put("binary_entropy", xe.binary_entropy(pr))
put("softmax", xe.softmax(z))
put("log_softmax", xe.log_softmax(z))
put("log_softmax_where", xe.log_softmax(z, where=z > -1))
put("logsumexp", xe.logsumexp(z))
put("logsumexp_b", xe.logsumexp(z, b=np.where(z > 0, -1.0, 1.0), return_sign=True))
put("logsumexp_all", xe.logsumexp(z, axis=None))
put("sigmoid", xe.sigmoid(z))
put("log_sigmoid", xe.log_sigmoid(z))
put("logit", xe.logit(pr))
put("one_hot", xe.one_hot(np.array([0, 2, 1]), 3))
put("smooth_labels", xe.smooth_labels(p, 0.1))
put("mixup", xe.mixup(z, np.array([0, 1, 2, 3]), alpha=0.4, seed=1, num_classes=5))
put("mixup_params", xe.mixup_params(4, alpha=0.4, seed=1))
put("sce", xe.softmax_cross_entropy(z, y, weight=w, label_smoothing=0.1))
put("sce_none", xe.softmax_cross_entropy(z, y, reduction="none"))
put("sce_zloss_softcap", xe.softmax_cross_entropy(z, y, z_loss=1e-3, softcap=5.0))
put("sce_probs_where", xe.softmax_cross_entropy(z, p, where=np.array([1, 1, 0, 1], bool)))
put("nll", xe.nll_loss(xe.log_softmax(z), y, reduction="none"))
put("poly1", xe.poly1_cross_entropy(z, y))
put("softmax_focal", xe.softmax_focal_loss(z, y, sample_weight=np.arange(1.0, 5.0)))
put("categorical_focal", xe.categorical_focal_loss(p, y))
put("bce", xe.binary_cross_entropy(pr, t))
put("bce_smooth", xe.binary_cross_entropy(pr, t, label_smoothing=0.1))
put("sbce", xe.sigmoid_binary_cross_entropy(zb, tb, pos_weight=np.full(3, 2.0),
                                            reduction="none"))
put("multilabel", xe.multilabel_cross_entropy(zb, tb, sample_weight=np.arange(4.0)))
put("sigmoid_focal", xe.sigmoid_focal_loss(zb, tb))
put("sce_grad", xe.softmax_cross_entropy_grad(z, y, weight=w, label_smoothing=0.2))
put("sbce_grad", xe.sigmoid_binary_cross_entropy_grad(zb, tb))
put("multilabel_grad", xe.multilabel_cross_entropy_grad(zb, tb))
put("gradient_check", curves.softmax_gradient_check([1.0, 2.0, 0.5], [0.0, 1.0, 0.0]).max_abs_diff)
refused("class_out_of_range", lambda: xe.softmax_cross_entropy(z, np.array([9, 0, 0, 0])))
refused("not_summing_to_one", lambda: xe.entropy([0.5, 0.6]))
refused("bad_reduction", lambda: xe.nll_loss(z, y, reduction="avg"))
refused("bad_base", lambda: xe.entropy(p, base=1.0))

rows = rng.normal(size=(40, 6))
labels = np.arange(40) % 3
data = tr.Dataset(rows[:30], labels[:30], rows[30:], labels[30:], num_classes=3)
results = tr.compare(["ce", "focal"], tr.TrainConfig(model="softmax", epochs=2), data)
table = article.format_table()
print(json.dumps({
    "results": out, "errors": errors, "tried": sorted(set(TRIED)),
    "training": tr.metrics_json(results),
    "article": hashlib.sha256(table.encode()).hexdigest(),
    "article_head": table.splitlines()[0],
    "teaching": sorted(n for n in vars(teaching) if not n.startswith("_")),
}))
'''
"""Every core function on NumPy; JSON of the exact bits, the errors, the hidden packages looked
for, a small training run and the article's table."""

IMPORT_PROBE = '''\
import importlib
MODULES = ["crossent", "crossent.errors", "crossent.measures", "crossent.activations",
           "crossent.targets", "crossent.losses", "crossent.grad", "crossent.teaching",
           "crossent.teaching.article", "crossent.teaching.content", "crossent.teaching.curves",
           "crossent.teaching.formula", "crossent.teaching.tour", "crossent.training",
           "crossent.training.data", "crossent.training.experiment", "crossent.training.losses",
           "crossent.training.metrics", "crossent.training.model", "crossent.training.optim",
           "crossent.integrations", "crossent.integrations.conventions", "crossent.__main__"]
optional = OPTIONAL_NAMES
report = {}
# one package hidden at a time, then all, then none (last: it hides nothing, so whatever it
# loaded would stay loaded); crossent is imported afresh each time
for block in [[name] for name in sorted(optional)] + [sorted(optional), []]:
    for name in [m for m in sys.modules if m.partition(".")[0] == "crossent"]:
        del sys.modules[name]
    BLOCKED.clear()
    BLOCKED.update(block)
    del TRIED[:]
    failed = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except BaseException as err:
            failed[name] = repr(err)
    report[",".join(block) if len(block) < 2 else "all"] = {
        "failed": failed, "tried": sorted(set(TRIED)),
        "loaded": sorted({m.partition(".")[0] for m in sys.modules} & optional)}
print(json.dumps(report))
'''
"""Imports every module that needs no extra with each optional package hidden, all of them,
and none; JSON of what failed, which hidden package was looked for and what got loaded."""

IMPORT_ERROR_PROBE = '''\
import importlib, traceback
got = {}
for name in MODULE_NAMES:
    try:
        importlib.import_module(name)
        got[name] = None
    except BaseException as err:
        got[name] = {"type": type(err).__name__, "message": str(err),
                     "is_import_error": isinstance(err, ImportError),
                     "name": getattr(err, "name", None),
                     "frames": len(traceback.extract_tb(err.__traceback__))}
print(json.dumps(got))
'''

TORCH_PROBE = '''\
import torch
import torch.nn.functional as F
import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.integrations import transformers as hf
from crossent.torch import _triton
from crossent.torch.distributed import (
    vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy)

torch.manual_seed(0)
dt = torch.float64
x = torch.randn(6, 5, dtype=dt) * 3
tgt = torch.tensor([0, 4, -100, 2, 1, 3])
cw = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25], dtype=dt)
h = torch.randn(6, 4, dtype=dt)
W = torch.randn(5, 4, dtype=dt)
out = {"available": _triton.available(), "values": {}, "refusals": {}}


def compare(key, ours, ref, leaves):
    """loss and gradients of ``ours()`` against ``ref()`` (both of the same leaves)."""
    got = []
    for fn in (ours, ref):
        ins = [t.clone().requires_grad_(True) for t in leaves]
        loss = fn(*ins)
        grads = torch.autograd.grad(loss, ins)
        got.append([loss.detach(), *grads])
    out["values"][key] = max(float((a - b).abs().max()) for a, b in zip(*got))


def ref_zloss(a):
    lse = torch.logsumexp(a, -1)[tgt != -100]
    return F.cross_entropy(a, tgt) + 1e-2 * (lse ** 2).mean()


compare("ce_auto", lambda a: xt.cross_entropy(a, tgt, weight=cw, label_smoothing=0.1),
        lambda a: F.cross_entropy(a, tgt, weight=cw, label_smoothing=0.1), [x])
compare("ce_rowblock", lambda a: xt.cross_entropy(a, tgt, backend="rowblock"),
        lambda a: F.cross_entropy(a, tgt), [x])
compare("ce_auto_zloss", lambda a: xt.cross_entropy(a, tgt, z_loss=1e-2), ref_zloss, [x])
compare("ce_module", lambda a: xt.CrossEntropyLoss(reduction="sum")(a, tgt),
        lambda a: F.cross_entropy(a, tgt, reduction="sum"), [x])
compare("linear_auto", lambda a, b: xt.linear_cross_entropy(a, b, tgt, chunk_size=2),
        lambda a, b: F.cross_entropy(a @ b.T, tgt), [h, W])
compare("linear_rowblock",
        lambda a, b: xt.linear_cross_entropy(a, b, tgt, backend="rowblock"),
        lambda a, b: F.cross_entropy(a @ b.T, tgt), [h, W])
compare("vocab_parallel", lambda a: vocab_parallel_cross_entropy(a, tgt),
        lambda a: F.cross_entropy(a, tgt), [x])
compare("vocab_parallel_linear",
        lambda a, b: vocab_parallel_linear_cross_entropy(a, b, tgt),
        lambda a, b: F.cross_entropy(a @ b.T, tgt), [h, W])
labels = torch.tensor([[1, 4, -100, 2], [0, 3, 3, 1]])
hs = torch.randn(2, 4, 4, dtype=dt)
compare("causal_lm_loss", lambda a, b: hf.causal_lm_loss(a, b, labels, loss_dtype=None),
        lambda a, b: F.cross_entropy((a @ b.T)[:, :-1].reshape(-1, 5),
                                     labels[:, 1:].reshape(-1)), [hs, W])


def refused(key, fn):
    try:
        fn()
    except Exception as err:
        out["refusals"][key] = [type(err).__name__, str(err)]
    else:
        out["refusals"][key] = ["no error", ""]


refused("ce", lambda: xt.cross_entropy(x, tgt, backend="triton"))
refused("linear", lambda: xt.linear_cross_entropy(h, W, tgt, backend="triton"))
refused("ce_module", lambda: xt.CrossEntropyLoss(backend="triton")(x, tgt))
refused("linear_module",
        lambda: xt.LinearCrossEntropyLoss(4, 5, backend="triton", dtype=dt)(h, tgt))
refused("vocab_parallel", lambda: vocab_parallel_cross_entropy(x, tgt, backend="triton"))
refused("vocab_parallel_linear",
        lambda: vocab_parallel_linear_cross_entropy(h, W, tgt, backend="triton"))
refused("hf_patch_linear", lambda: hf.patch(torch.nn.Linear(2, 2)))
# a class that passes patch's class check (its name and module are a supported model's):
# patch then needs transformers itself
fake = type("LlamaForCausalLM", (torch.nn.Module,),
            {"__module__": "transformers.models.llama.modeling_llama"})
refused("hf_patch_needs_transformers", lambda: hf.patch(fake))
out["tried"] = sorted(set(TRIED))
print(json.dumps(out))
'''


def _spec(code: str, *args: str, block: str = "", env: dict[str, str] | None = None,
          subdir: str = "") -> dict[str, Any]:
    return {"code": code, "args": args, "block": block, "env": env or {}, "subdir": subdir}


def _cli(block: str, *args: str, prefix: str = "") -> dict[str, Any]:
    return _spec(prefix + CLI, *args, block=block)


SPECS: dict[str, dict[str, Any]] = {
    # --- the core and `python -m crossent` ---------------------------------------------
    "imports": _spec(IMPORT_PROBE),
    "core-all": _spec(CORE_PROBE, block=CORE_ONLY),
    "core-none": _spec(CORE_PROBE),
    "python-m-crossent": _spec("import runpy\nrunpy.run_module('crossent', run_name='__main__',"
                               " alter_sys=True)\n", block=CORE_ONLY),
    "python-m-crossent-args": _spec(
        "import runpy\nrunpy.run_module('crossent', run_name='__main__', alter_sys=True)\n",
        "tour", "--no-plots", "--html", "page.html", subdir="m-args"),
    "training-no-sklearn": _spec(
        "import crossent.training as tr\n"
        "try:\n    tr.load_digits_split()\n"
        "except ImportError as err:\n"
        "    print(json.dumps([type(err).__name__, getattr(err, 'name', None), str(err)]))\n",
        block="sklearn"),
    "torch-missing-imports": _spec(
        IMPORT_ERROR_PROBE.replace("MODULE_NAMES", repr([
            "crossent.torch", "crossent.torch.distributed", "crossent.torch.bench",
            "crossent.integrations.transformers"])), block=CORE_ONLY),
    # --- crossent[torch] without triton or transformers ---------------------------------
    "torch-probe": _spec(TORCH_PROBE, block=TORCH_ONLY + ",accelerate",
                         env={"TRITON_INTERPRET": "1"}),
    # --- the command line ---------------------------------------------------------------
    "typer-help": _cli("typer", "--help"),
    "typer-explain": _cli("typer", "explain", "--probs", "0.2,0.8", "--target", "1"),
    "typer-bench": _cli("typer", "bench", "ce-small", "--quick"),
    "rich-version": _cli("rich", "--version"),
    "rich-tour-help": _cli("rich", "tour", "--help"),
    "rich-python-m-cli": _spec("import runpy\nrunpy.run_module('crossent.cli', "
                               "run_name='__main__', alter_sys=True)\n",
                               "quiz", "--seed", "0", block="rich"),
    "core-only-train": _cli(CORE_ONLY, "train", "--epochs", "1", "--out", "t"),
    "mpl-tour": _cli("matplotlib", "tour", "--out", "figs", prefix=QUICK_TOUR),
    "mpl-tour-html": _cli("matplotlib," + CLI_NO_TORCH, "tour", "--no-plots", "--base", "e",
                          "--html", "page/tour.html", prefix=QUICK_TOUR),
    "mpl-train": _cli("matplotlib", "train", "--epochs", "1", "--model", "softmax", "--loss",
                      "ce", "--out", "mpl-train"),
    "mpl-train-no-plots": _cli("matplotlib", "train", "--epochs", "1", "--model", "softmax",
                               "--loss", "ce,focal", "--no-plots", "--out", "mpl-train-np"),
    "mpl-explain": _cli("matplotlib," + CLI_NO_TORCH, "explain", "--logits", "1.2,0.3,2.0",
                        "--target", "0,0,1", "--label-smoothing", "0.1"),
    "mpl-quiz": _cli("matplotlib," + CLI_NO_TORCH, "quiz", "--seed", "3", "--answers",
                     "/dev/null"),
    "mpl-bench": _cli("matplotlib", "bench", *BENCH_ARGS, "--out", "mpl-bench",
                      prefix=FAST_BENCH),
    "mpl-bench-module": _spec(FAST_BENCH + f"bench.main({list(BENCH_ARGS)!r} + "
                              "['--out', 'mpl-bench-m'])\n", block="matplotlib"),
    "sklearn-train": _cli("sklearn", "train", "--epochs", "1", "--out", "sk-train"),
    "sklearn-tour": _cli("sklearn", "tour", "--no-plots"),
    "sklearn-plot-training": _cli("sklearn", "plot", "training", "--out", "sk/training.png"),
    "torch-bench": _cli(CLI_NO_TORCH, "bench", "ce-small", "--quick", "--out", "tb"),
    "torch-bench-help": _cli(CLI_NO_TORCH, "bench", "--help"),
    "torch-bench-module": _spec("import runpy\nrunpy.run_module('crossent.torch.bench', "
                                "run_name='__main__', alter_sys=True)\n", "ce-small",
                                "--quick", block=CLI_NO_TORCH),
}


def _run(spec: dict[str, Any], root: Path) -> subprocess.CompletedProcess:
    cwd = root / spec["subdir"] if spec["subdir"] else root
    cwd.mkdir(parents=True, exist_ok=True)
    code = PRELUDE + "import json, sys\n" + spec["code"].replace(
        "OPTIONAL_NAMES", repr(set(OPTIONAL)))
    env = {**os.environ, "H74_BLOCK": spec["block"], **spec["env"]}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-c", code, *spec["args"]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("h74")


@pytest.fixture(scope="module")
def runs(workdir: Path) -> Any:
    """Every subprocess of this file, started together (three at a time), slowest first."""
    slow = ("mpl-bench", "mpl-bench-module", "torch-probe", "mpl-train", "mpl-train-no-plots")
    order = [*slow, *(k for k in SPECS if k not in slow)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures: dict[str, Future] = {k: pool.submit(_run, SPECS[k], workdir) for k in order}
        yield futures
        for f in futures.values():
            f.cancel()


def result(runs: Any, key: str) -> subprocess.CompletedProcess:
    return runs[key].result()


def payload(runs: Any, key: str) -> Any:
    done = result(runs, key)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_line_failure(done: subprocess.CompletedProcess, line: str, code: int = 1) -> None:
    """The README's contract for a missing extra: that one line on stderr, the exit code,
    no traceback, nothing on stdout."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (done.returncode, done.stderr, done.stdout) == (code, line + "\n", "")


# ------------------------------------------------------------------------------------------
# the core: imports, calls, python -m crossent
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [*OPTIONAL, "all", ""])
def test_core_modules_import_without_any_optional_package(runs, hidden):
    """Every core, teaching and training module imports with each optional package missing
    (and all of them): none is imported, none is even looked for (a ``try: import scipy``
    with a fallback would show here), and with everything installed none is loaded either."""
    got = payload(runs, "imports")[hidden]
    assert got == {"failed": {}, "tried": [], "loaded": []}


def test_core_calls_need_no_optional_package(runs):
    """Every core function (and the teaching/training code that needs no extra) gives the
    same bits with every optional package missing as with all installed, refuses bad input
    with the same InputError, and never looks for an optional package at call time."""
    bare, full = payload(runs, "core-all"), payload(runs, "core-none")
    assert bare["tried"] == []
    assert bare["results"] == full["results"]
    assert bare["errors"] == full["errors"]
    assert {kind for kind, _ in bare["errors"].values()} == {"InputError"}
    assert bare["training"] == full["training"]
    assert bare["article"] == full["article"]
    assert bare["teaching"] == full["teaching"]


def test_core_results_without_optional_packages_match_independent_references(runs):
    """The numbers computed with nothing optional installed are SciPy's, scikit-learn's
    and torch's (float64), computed here from the same inputs."""
    import scipy.special as sp
    import scipy.stats
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import log_loss

    ns: dict[str, Any] = {}
    exec(CORE_INPUTS, ns)  # the probe's inputs, rebuilt here from the same seed
    z, y, w, p, q, pr, t = (ns[k] for k in ("z", "y", "w", "p", "q", "pr", "t"))
    zb, tb = ns["zb"], ns["tb"]
    got = {k: np.array([float.fromhex(v) for v in vals])
           for k, vals in payload(runs, "core-all")["results"].items()}
    tz, ty = torch.as_tensor(z), torch.as_tensor(y)
    tw = torch.as_tensor(w)
    lse, sign = sp.logsumexp(z, b=np.where(z > 0, -1.0, 1.0), axis=-1, return_sign=True)
    zt = tz.clone().requires_grad_(True)
    ce = F.cross_entropy(zt, ty, weight=tw, label_smoothing=0.2)
    (grad,) = torch.autograd.grad(ce, zt)
    refs = {
        "surprisal": np.log2(1000.0),
        "entropy": scipy.stats.entropy(p, base=2, axis=-1),
        "cross_entropy": -(p * np.log(q)).sum(-1),
        "kl_divergence": sp.rel_entr(p, q).sum(-1),
        "kl_terms": sp.rel_entr(p, q) / np.log(10),
        "softmax": sp.softmax(z, axis=-1),
        "log_softmax": sp.log_softmax(z, axis=-1),
        "logsumexp": sp.logsumexp(z, axis=-1),
        "logsumexp_b.0": lse, "logsumexp_b.1": sign,
        "logsumexp_all": sp.logsumexp(z),
        "sigmoid": sp.expit(z),
        "log_sigmoid": sp.log_expit(z),
        "logit": sp.logit(pr),
        "bce": log_loss(t, pr),
        "sce": F.cross_entropy(tz, ty, weight=tw, label_smoothing=0.1).numpy(),
        "sce_none": F.cross_entropy(tz, ty, reduction="none").numpy(),
        "nll": F.nll_loss(F.log_softmax(tz, -1), ty, reduction="none").numpy(),
        "sbce": F.binary_cross_entropy_with_logits(
            torch.as_tensor(zb), torch.as_tensor(tb), pos_weight=torch.full((3,), 2.0,
                                                                           dtype=torch.float64),
            reduction="none").numpy(),
        "sce_grad": grad.numpy(),
    }
    for key, ref in refs.items():
        np.testing.assert_allclose(got[key], np.ravel(ref), rtol=1e-12, atol=1e-13,
                                   err_msg=key)


def test_python_m_crossent_with_nothing_optional(runs):
    """README: without the cli extra ``python -m crossent`` prints the worked examples."""
    done = result(runs, "python-m-crossent")
    assert (done.returncode, done.stderr) == (0, "")
    head = payload(runs, "core-none")["article_head"]
    assert done.stdout.startswith("crossent: the article's worked examples, computed (not "
                                  "typed in)\n\n" + head + "\n")


def test_python_m_crossent_does_not_ignore_arguments(runs, workdir):
    done = result(runs, "python-m-crossent-args")
    written = (workdir / "m-args" / "page.html").exists()
    assert written or (done.returncode != 0 and done.stderr.count("\n") == 1
                       and "Traceback" not in done.stderr), (done.returncode, done.stderr)


# ------------------------------------------------------------------------------------------
# the Python API of the extras: crossent.torch, integrations, training, teaching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["crossent.torch", "crossent.torch.distributed",
                                    "crossent.torch.bench"])
def test_torch_modules_without_torch_raise_module_not_found_for_torch(runs, module):
    """Whatever the message, the error stays a ModuleNotFoundError whose ``name`` is torch:
    the CLI's mapping to the extra (cli/app.py:_failure) depends on it."""
    got = payload(runs, "torch-missing-imports")[module]
    assert got["is_import_error"] and got["name"] == "torch", got


@pytest.mark.parametrize("module", ["crossent.torch", "crossent.torch.distributed",
                                    "crossent.integrations.transformers"])
def test_torch_modules_without_torch_name_the_extra(runs, module):
    got = payload(runs, "torch-missing-imports")[module]
    extras = ("crossent[torch]", "crossent[hf]")
    assert got["is_import_error"] and got["name"] == "torch", got
    assert any(extra in got["message"] for extra in extras), got["message"]


def test_training_without_sklearn_names_the_extra(runs):
    kind, name, message = payload(runs, "training-no-sklearn")
    assert (kind, name) == ("ModuleNotFoundError", "sklearn")  # the CLI maps it by name
    assert "scikit-learn" in message and "crossent[" in message, message


def test_torch_without_triton_or_transformers(runs):
    """``pip install 'crossent[torch]'``: torch present, triton and transformers missing
    (TRITON_INTERPRET=1 set, so triton's absence is the only obstacle). ``backend="auto"``
    (small input: torch's kernel; z_loss: the row-block kernel), ``"rowblock"``, the modules,
    the linear head, vocab-parallel (single process) and ``causal_lm_loss`` give torch's
    loss and gradients in float64; ``backend="triton"`` is an UnsupportedError that names
    triton as not installed, on every entry point."""
    got = payload(runs, "torch-probe")
    assert got["available"] is False
    for key, diff in got["values"].items():
        assert diff < 1e-12, (key, diff)
    assert set(got["values"]) == {"ce_auto", "ce_rowblock", "ce_auto_zloss", "ce_module",
                                  "linear_auto", "linear_rowblock", "vocab_parallel",
                                  "vocab_parallel_linear", "causal_lm_loss"}
    refusals = dict(got["refusals"])
    assert refusals.pop("hf_patch_linear")[0] == "InputError"
    refusals.pop("hf_patch_needs_transformers")
    for key, (kind, message) in refusals.items():
        assert kind == "UnsupportedError", (key, kind, message)
        assert "backend='triton'" in message and "triton is not installed" in message, message
    assert set(got["tried"]) <= {"triton", "transformers"}  # only looked for, never loaded


def test_patch_without_transformers_names_the_hf_extra(runs):
    kind, message = payload(runs, "torch-probe")["refusals"]["hf_patch_needs_transformers"]
    assert "crossent[hf]" in message, (kind, message)


# ------------------------------------------------------------------------------------------
# the command line (README: missing extra -> one line naming it, exit code 1)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["typer-help", "typer-explain", "typer-bench",
                                 "rich-tour-help", "rich-python-m-cli"])
def test_cli_without_typer_or_rich_says_which_extra(runs, key):
    module = key.partition("-")[0]
    one_line_failure(result(runs, key), f"crossent: the command line needs the cli extra "
                                        f"({module} is missing): pip install 'crossent[cli]'")


def test_cli_version_without_rich_needs_no_extra(runs):
    """``crossent --version`` prints the package's version without the cli extra (H98-4)."""
    from crossent import __version__

    done = result(runs, "rich-version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"crossent {__version__}\n", "")


def test_cli_train_with_nothing_optional(runs):
    """The console script installed by a bare ``pip install crossent``."""
    one_line_failure(result(runs, "core-only-train"), "crossent: the command line needs the "
                     "cli extra (typer is missing): pip install 'crossent[cli]'")


def test_tour_without_matplotlib_fails_in_one_line_before_writing(runs, workdir):
    one_line_failure(result(runs, "mpl-tour"),
                     "crossent tour: error: needs matplotlib: pip install 'crossent[cli]'")
    assert not (workdir / "figs").exists()


def test_commands_that_draw_nothing_need_neither_matplotlib_nor_torch(runs, workdir):
    """``crossent[cli]`` less matplotlib and torch (and JAX, transformers, triton): the tour
    with ``--no-plots`` and its web page, explain and quiz work; train with ``--no-plots``
    works without matplotlib and writes metrics.json."""
    for key in ("mpl-tour-html", "mpl-explain", "mpl-quiz", "mpl-train-no-plots"):
        done = result(runs, key)
        assert (done.returncode, done.stderr) == (0, ""), (key, done.stderr[-3000:])
    page = (workdir / "page" / "tour.html").read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html") and "</html>" in page
    assert "softmax" in result(runs, "mpl-explain").stdout
    metrics = json.loads((workdir / "mpl-train-np" / "metrics.json").read_text())
    assert set(metrics) == {"ce", "focal"}
    assert not list((workdir / "mpl-train-np").glob("*.png"))


def test_train_without_matplotlib_fails_before_training(runs, workdir):
    done = result(runs, "mpl-train")
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1:] == [
        "crossent train: error: needs matplotlib: pip install 'crossent[cli]'"]
    assert "train loss" not in done.stdout  # no epoch was run
    assert not (workdir / "mpl-train").exists()


def test_bench_without_matplotlib_fails_before_timing(runs, workdir):
    done = result(runs, "mpl-bench")
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1:] == [
        "crossent bench: error: needs matplotlib: pip install 'crossent[cli]'"]
    assert "timed round" not in done.stderr and done.stdout == ""
    assert not (workdir / "mpl-bench").exists()


def test_python_m_bench_without_matplotlib_is_one_line(runs, workdir):
    """H74-6 (fixed): ``python -m crossent.torch.bench`` without matplotlib is one line naming
    the extra, exit code 1, before the first timing (as ``crossent bench``)."""
    one_line_failure(result(runs, "mpl-bench-module"), "python -m crossent.torch.bench: "
                     "error: needs matplotlib: pip install 'crossent[cli]'")
    assert not (workdir / "mpl-bench-m").exists()


def test_python_m_bench_without_torch_ends_naming_the_extra(runs):
    """H74-6, torch: the traceback stays, and cannot go from crossent's side. Python's runpy
    imports the package ``crossent.torch`` before the first line of ``bench.py`` runs, and
    that import must raise ModuleNotFoundError(name='torch') (the tests above); runpy lets
    it through as a traceback. What crossent controls holds: exit code 1 and the last line
    names the extra to install."""
    done = result(runs, "torch-bench-module")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == ("ModuleNotFoundError: crossent.torch needs "
                                            "PyTorch: pip install 'crossent[torch]'")


def test_train_without_sklearn_names_the_extra(runs, workdir):
    one_line_failure(result(runs, "sklearn-train"),
                     "crossent train: error: needs sklearn: pip install 'crossent[cli]'")
    assert not (workdir / "sk-train").exists()


@pytest.mark.parametrize("key, command", [("sklearn-tour", "tour"),
                                          ("sklearn-plot-training", "plot")])
def test_tour_without_sklearn_exits_as_a_missing_extra(runs, workdir, key, command):
    done = result(runs, key)
    assert "Traceback" not in done.stderr
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (1, "", 1), done.stderr
    assert done.stderr.startswith(f"crossent {command}: error: ")
    assert "pip install 'crossent[cli]'" in done.stderr
    assert not (workdir / "sk").exists()


def test_tour_without_sklearn_is_one_line_naming_the_extra(runs, workdir):
    """The part of H74-7 that holds: one line, the extra named, nothing written."""
    for key in ("sklearn-tour", "sklearn-plot-training"):
        done = result(runs, key)
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert done.returncode != 0 and done.stderr.count("\n") == 1
        assert "pip install 'crossent[cli]'" in done.stderr
    assert not (workdir / "sk").exists()


def test_bench_without_torch_names_the_torch_extra(runs, workdir):
    one_line_failure(result(runs, "torch-bench"),
                     "crossent bench: error: needs torch: pip install 'crossent[torch]'")
    assert not (workdir / "tb").exists()
    helped = result(runs, "torch-bench-help")
    assert (helped.returncode, helped.stderr) == (0, "")
    assert "--device" in helped.stdout
