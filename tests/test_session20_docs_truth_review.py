"""Adversarial review of the documentation's promises (README.md, docs/guarantees.md,
docs/pitfalls.md): each statement checked against torch / SciPy / the real signatures.

A statement that holds and was not tested elsewhere is a plain test; a false one is a strict
xfail whose reason names the file and line; the three found at stop 29 (docs/pitfalls.md's
softmax line and its numbering, README's inplace_backward row) are corrected and pass.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest

import crossent as xe

torch = pytest.importorskip("torch")
F = torch.nn.functional
xt = pytest.importorskip("crossent.torch")

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_line(fragment: str) -> int:
    """The 1-based README line holding ``fragment`` (so a reason's line number is real)."""
    for number, line in enumerate(README.splitlines(), 1):
        if fragment in line:
            return number
    raise AssertionError(f"README no longer says {fragment!r}")


# --- option names and defaults quoted in the docs vs the real signatures -------------------


README_KEYWORDS = ("z_loss", "softcap", "num_items", "loss_dtype", "inplace_backward",
                   "backend")


def test_readme_keyword_table_names_are_cross_entropy_parameters():
    """README (Performance): "Both take crossent's keywords too" - cross_entropy does."""
    params = inspect.signature(xt.cross_entropy).parameters
    assert all(k in params for k in README_KEYWORDS)
    assert "shift" in inspect.signature(xt.linear_cross_entropy).parameters


def _torch_params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_cross_entropy_has_torchs_signature_as_a_prefix():
    """README: "drop-in replacements for torch's (same positional signature)"."""
    ours = _torch_params(xt.cross_entropy)
    theirs = _torch_params(F.cross_entropy)
    assert ours[: len(theirs)] == theirs


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")
def test_linear_cross_entropy_takes_every_torch_parameter_with_its_default():
    ours = {p.name: p for p in inspect.signature(xt.linear_cross_entropy).parameters.values()}
    theirs = list(inspect.signature(F.linear_cross_entropy).parameters.values())
    for p in theirs:
        assert p.name in ours, p.name
        if p.default is not inspect.Parameter.empty:
            assert ours[p.name].default == p.default, p.name
    positional = [p.name for p in theirs if p.kind is p.POSITIONAL_OR_KEYWORD]
    ours_positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert ours_positional[: len(positional)] == positional


def test_modules_have_torchs_constructors_as_a_prefix():
    ours = _torch_params(xt.CrossEntropyLoss.__init__)
    theirs = _torch_params(torch.nn.CrossEntropyLoss.__init__)
    assert [n for n, *_ in ours[: len(theirs)]] == [n for n, *_ in theirs]
    assert [d for *_, d in ours[: len(theirs)]] == [d for *_, d in theirs]
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        ours = {p.name: p for p in
                inspect.signature(xt.LinearCrossEntropyLoss.__init__).parameters.values()}
        for p in inspect.signature(torch.nn.LinearCrossEntropyLoss.__init__).parameters.values():
            assert p.name in ours, p.name
            if p.default is not inspect.Parameter.empty:
                assert ours[p.name].default == p.default, p.name


def test_train_and_bench_defaults_are_the_readmes():
    """README: train's defaults (mlp, SGD, lr 0.1, batch 32, 30 epochs, seed 0, smoothing
    0.1, focal gamma 2, 64 hidden units), the output folders, bench's one warm-up and 5
    runs, --load at most 4 per CPU."""
    import importlib

    app_mod = importlib.import_module("crossent.cli.app")
    from crossent.training.experiment import TrainConfig

    def defaults(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items()}

    train = defaults(app_mod.train)
    assert (train["model"], train["optimizer"], train["lr"], train["batch_size"],
            train["epochs"], train["seed"], train["hidden"], train["out_dir"]) == (
        "mlp", "sgd", 0.1, 32, 30, 0, 64, "crossent-train")
    config = TrainConfig()
    assert (config.label_smoothing, config.gamma, config.n_bins) == (0.1, 2.0, 15)
    assert defaults(app_mod.tour)["out_dir"] == "crossent-figures"
    bench = defaults(app_mod.bench)
    assert (bench["repeats"], bench["warmup"], bench["out_dir"]) == (5, 1, "crossent-bench")
    from crossent.torch import bench as bench_mod

    assert bench_mod.LOAD_PER_CPU == 4


# --- the CLI's --help against the README's command table -----------------------------------


def _readme_cli_rows() -> dict[str, str]:
    section = README.split("## Command line", 1)[1].split("```console", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `crossent (\S+)", line)
        if m and not m.group(1).startswith("--"):
            rows[m.group(1)] = line  # the whole row: its usage and its description
    return rows


def test_every_option_the_readme_table_shows_is_in_the_commands_help():
    from typer.testing import CliRunner

    from crossent.cli import app

    runner = CliRunner()
    rows = _readme_cli_rows()
    assert set(rows) == {"tour", "explain", "quiz", "plot", "train", "bench"}
    top = runner.invoke(app, ["--help"], terminal_width=200).stdout
    listed = [line.split()[0] for line in top[top.index("Commands:"):].splitlines()[1:]
              if line.strip()]
    assert sorted(listed) == sorted(rows)
    for command, usage in rows.items():
        text = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
        for option in set(re.findall(r"--[a-z][a-z-]*", usage)):
            assert option in text, (command, option)


def test_plot_names_are_the_readmes():
    from crossent.cli import plots

    line = next(x for x in README.splitlines() if x.startswith("| `crossent plot NAME"))
    names = re.findall(r"`([a-z-]+)`", line.split("one figure:", 1)[1].split(";")[0])
    assert tuple(names) == tuple(plots.NAMES)


# --- README code examples and their printed outputs ---------------------------------------


def test_conventions_example_prints_the_readmes_output():
    section = README.split("## Which library's cross-entropy?", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```python\n.*?```\n\n```\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    assert [line.rstrip() for line in printed[:-1]] == [
        line.rstrip() for line in shown.splitlines()]
    comment = float(re.search(r"# (\d\.\d+)", code).group(1))
    assert float(printed[-1]) == comment
    # independently: optax's convention divides torch's summed smoothed loss by all rows
    z = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    ref = F.cross_entropy(z, torch.tensor([0]), label_smoothing=0.1, reduction="sum") / 2
    assert math.isclose(comment, ref.item(), rel_tol=1e-15)


# --- pitfalls.md ---------------------------------------------------------------------------


def test_pitfalls_softmax_of_plus_inf_row_is_all_nan_as_torch():
    """docs/pitfalls.md: softmax([+inf, 1]) is all NaN in crossent, torch and SciPy."""
    with np.errstate(invalid="ignore"):
        got = xe.softmax(np.array([np.inf, 1.0]))
    assert np.isnan(got).all()
    assert torch.isnan(torch.softmax(torch.tensor([math.inf, 1.0]), -1)).all()


def test_pitfalls_zero_target_weights_with_smoothing():
    """docs/pitfalls.md:47: every target class weight 0, smoothing on, "mean": the loss is
    NaN in both; the analytic gradient is +-inf where torch's autograd gives NaN."""
    z = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], dtype=torch.float64,
                     requires_grad=True)
    y = torch.tensor([0, 1])
    w = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    ref = F.cross_entropy(z, y, weight=w, label_smoothing=0.1)
    assert torch.isnan(ref)
    (g_ref,) = torch.autograd.grad(ref, z)
    zn, yn, wn = z.detach().numpy(), y.numpy(), w.numpy()
    loss = xe.softmax_cross_entropy(zn, yn, weight=wn, label_smoothing=0.1)
    assert np.isnan(loss)
    grad = xe.softmax_cross_entropy_grad(zn, yn, weight=wn, label_smoothing=0.1)
    assert np.isnan(g_ref.numpy()).all()
    assert np.isinf(grad).all(), grad


def test_pitfalls_focal_small_gamma_saturated_gradient_is_zero():
    """docs/pitfalls.md:45: 0 < gamma < 1, 1 - p_t underflows: the gradient is its limit 0
    (torchvision's formula: NaN)."""
    x = torch.tensor([800.0, -800.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = xe.sigmoid_focal_loss(x, t, gamma=0.5, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g, torch.zeros(2, dtype=torch.float64)), g


# --- README's core promises ---------------------------------------------------------------


def test_kl_divergence_terms_is_torchs_kldivloss_none_also_at_zero():
    """README (core table): kl_divergence_terms is pointwise, as KLDivLoss(reduction="none")."""
    p = np.array([[0.0, 0.25, 0.75], [0.5, 0.5, 0.0]])
    q = np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    ref = F.kl_div(torch.tensor(q).log(), torch.tensor(p), reduction="none").numpy()
    np.testing.assert_allclose(xe.kl_divergence_terms(p, q), ref, rtol=1e-14, atol=0)


def test_nll_loss_matches_torch_with_weights_ignore_index_and_axis_1():
    """README: xe.nll_loss(log_p, y, weight=w, ignore_index=i, axis=1) = F.nll_loss, the
    same "mean" denominator, NaN when it is 0."""
    rng = np.random.default_rng(0)
    log_p = np.log(rng.dirichlet(np.ones(4), size=(5, 3)).transpose(0, 2, 1))  # (5, 4, 3)
    y = rng.integers(0, 4, size=(5, 3))
    y[0, 0] = 2
    y[1] = -1
    w = np.array([0.5, 2.0, 1.0, 3.0])
    ref = F.nll_loss(torch.tensor(log_p), torch.tensor(y), weight=torch.tensor(w),
                     ignore_index=-1)
    got = xe.nll_loss(log_p, y, weight=w, ignore_index=-1, axis=1)
    assert math.isclose(float(got), ref.item(), rel_tol=1e-13)
    zero = xe.nll_loss(log_p, np.full((5, 3), -1), ignore_index=-1, axis=1)
    assert np.isnan(zero)


def test_class_mask_of_one_dimension_masks_rows_even_when_n_equals_c():
    """README (Coming from optax): a (C,) mask on (N, C) logits masks rows even when N = C."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 3))
    y = np.array([0, 2, 1])
    m = np.array([True, False, True])
    got = xe.softmax_cross_entropy(z, y, where=m, reduction="none")
    ref = F.cross_entropy(torch.tensor(z), torch.tensor(y), reduction="none").numpy()
    np.testing.assert_allclose(got, np.where(m, ref, 0.0), rtol=1e-13, atol=0)


def test_poly1_validates_soft_targets_within_1e_4_unless_told_not_to():
    z = np.array([[1.0, 0.0, -1.0]])
    t = np.array([[0.5, 0.3, 0.2002]])
    with pytest.raises(xe.InputError, match="target"):
        xe.poly1_cross_entropy(z, t, epsilon=2.0)
    xe.poly1_cross_entropy(z, np.array([[0.5, 0.3, 0.20005]]), epsilon=2.0)
    assert np.isfinite(xe.poly1_cross_entropy(z, t, epsilon=2.0, validate=False))


def test_softmax_axis_none_and_0d_as_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(xe.softmax(x, axis=None), special.softmax(x, axis=None),
                               rtol=1e-15)
    np.testing.assert_allclose(xe.log_softmax(x, axis=None),
                               special.log_softmax(x, axis=None), rtol=1e-15)
    assert float(xe.softmax(np.float64(3.0), axis=None)) == float(
        special.softmax(np.float64(3.0), axis=None))


# --- crossent.torch: guarantees.md ---------------------------------------------------------


def _routes():
    return ("auto", "native", "rowblock")


@pytest.mark.parametrize("backend", _routes())
def test_float64_loss_of_float32_logits_rounds_grad_output_first(backend):
    """docs/guarantees.md:32: loss_dtype=float64 of float32 logits: backward rounds
    grad_output to float32 first, as torch's ToCopyBackward (a float64 1e300 is inf)."""
    torch.manual_seed(0)
    z = torch.randn(4, 5)
    y = torch.tensor([0, 3, -100, 2])
    go = torch.tensor(1e300, dtype=torch.float64)
    z_ref = z.clone().requires_grad_()
    F.cross_entropy(z_ref, y).to(torch.float64).backward(go)
    z_ours = z.clone().requires_grad_()
    loss = xt.cross_entropy(z_ours, y, loss_dtype=torch.float64, backend=backend)
    assert loss.dtype == torch.float64
    loss.backward(go)
    assert torch.equal(z_ours.grad.isnan(), z_ref.grad.isnan())
    assert torch.equal(z_ours.grad.isinf(), z_ref.grad.isinf())
    finite = z_ref.grad.isfinite()
    assert torch.equal(z_ours.grad[finite], z_ref.grad[finite])


@pytest.mark.parametrize("case", ["all_ignored", "prob", "smooth_ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_classes_as_torch(case, reduction):
    """docs/guarantees.md:33: C = 0 - NaN "mean" / 0 when every target is ignored or for
    probability targets, NaN with label smoothing, as torch; the (N, 0) gradient."""
    z = torch.zeros(3, 0, requires_grad=True)
    kw = {}
    if case == "prob":
        target = torch.zeros(3, 0)
    else:
        target = torch.full((3,), -100)
        if case == "smooth_ignored":
            kw["label_smoothing"] = 0.1
    ref = F.cross_entropy(z, target, reduction=reduction, **kw)
    got = xt.cross_entropy(z, target, reduction=reduction, **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)
    got.sum().backward()
    assert z.grad.shape == (3, 0)


def test_zero_classes_other_index_is_index_error():
    z = torch.zeros(2, 0, requires_grad=True)
    with pytest.raises(IndexError):
        F.cross_entropy(z, torch.tensor([0, -100]))
    with pytest.raises(IndexError):
        xt.cross_entropy(z, torch.tensor([0, -100]))


def test_shift_refusals_name_what_they_refuse():
    """docs/guarantees.md:85-86: shift=True with a 4-D input is InputError naming shift;
    with probability targets or a K-dimensional weight, UnsupportedError."""
    w = torch.randn(5, 4)
    with pytest.raises(xe.InputError, match="shift"):
        xt.linear_cross_entropy(torch.randn(2, 3, 3, 4), w, torch.zeros(2, 3, 3,
                                dtype=torch.long), shift=True)
    with pytest.raises(xe.UnsupportedError):
        xt.linear_cross_entropy(torch.randn(2, 3, 4), w, torch.softmax(torch.randn(2, 3, 5),
                                -1), shift=True)


def test_linear_head_refuses_ignore_index_with_probability_targets():
    """docs/guarantees.md (Raises): ignore_index given with probability targets in
    linear_cross_entropy -> InputError (torch raises)."""
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    t = torch.softmax(torch.randn(4, 5), -1)
    if hasattr(F, "linear_cross_entropy"):
        with pytest.raises(Exception):  # noqa: B017 - torch's own type
            F.linear_cross_entropy(x, w, t, ignore_index=-1)
    with pytest.raises(xe.InputError, match="ignore_index"):
        xt.linear_cross_entropy(x, w, t, ignore_index=-1)


def test_label_smoothing_as_0d_tensor_is_refused_by_name():
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(xe.InputError, match="label_smoothing"):
        xt.cross_entropy(z, y, label_smoothing=torch.tensor(0.1))


def test_statistics_are_float32_for_bfloat16_and_accuracy_takes_the_first_tie():
    """README (statistics): every float field float32 for low-precision input; accuracy is
    torch.argmax's first of tied maxima; ignored rows NaN / False."""
    z = torch.zeros(6, 7, dtype=torch.bfloat16)
    z[1, 3] = 1.0
    z[2, 4] = z[2, 5] = 2.0
    y = torch.tensor([0, 3, 5, 4, -100, 1])
    for backend in ("rowblock", "auto"):
        _, s = xt.cross_entropy(z, y, backend=backend,
                                statistics=("lse", "entropy", "target_logprob", "accuracy"))
        for field in (s.lse, s.entropy, s.target_logprob):
            assert field.dtype == torch.float32
        ref_acc = torch.argmax(z.float(), 1) == y
        ref_acc[4] = False
        assert torch.equal(s.accuracy, ref_acc), backend
        assert torch.isnan(s.lse[4]) and not s.counted[4]


def test_statistics_refuse_index_only_fields_for_probability_targets():
    z = torch.randn(3, 4)
    t = torch.softmax(torch.randn(3, 4), -1)
    for name in ("target_logprob", "accuracy"):
        with pytest.raises(xe.UnsupportedError):
            xt.cross_entropy(z, t, statistics=name)
    _, s = xt.cross_entropy(z, t, statistics=("lse", "z_loss", "entropy"))
    torch.testing.assert_close(s.lse, torch.logsumexp(z, 1))


def test_num_items_with_reduction_none_is_refused_by_name():
    """docs/guarantees.md:81."""
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(xe.InputError, match="num_items"):
        xt.cross_entropy(z, y, reduction="none", num_items=3)
    with pytest.raises(xe.InputError, match="num_items"):
        xt.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), y, reduction="none",
                                num_items=3)


def test_chunk_size_is_ignored_with_a_warning_for_k_dimensional_heads():
    """docs/guarantees.md:145: chunk_size/options ignored (with a warning) for K-dim heads,
    whose logits are formed whole, as torch."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(5, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (4, 2))
    with pytest.warns(UserWarning, match="chunk_size"):
        got = xt.linear_cross_entropy(x, w, y, chunk_size=2)
    ref = F.cross_entropy(torch.einsum("nd,ckd->nck", x, w), y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_linear_statistics_have_the_shifted_row_shape():
    """README (statistics): every field has the target's row shape, (B, T - 1) with
    shift=True; ignored tokens (the shifted-out last position counts as none) NaN."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 4), torch.randn(7, 4)
    y = torch.randint(0, 7, (2, 5))
    y[0, 2] = -100
    loss, s = xt.linear_cross_entropy(x, w, y, shift=True, ignore_index=-100,
                                      statistics=("lse", "accuracy", "entropy"))
    assert s.lse.shape == s.accuracy.shape == s.entropy.shape == s.counted.shape == (2, 4)
    assert torch.isnan(s.lse[0, 1]) and not s.counted[0, 1] and not s.accuracy[0, 1]
    ref_lse = torch.logsumexp(F.linear(x[:, :-1], w), -1)
    mask = y[:, 1:] != -100
    torch.testing.assert_close(s.lse[mask], ref_lse[mask])
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x[:, :-1], w).reshape(-1, 7),
                                                     y[:, 1:].reshape(-1)))


def test_global_num_items_without_a_group_counts_every_micro_batch():
    """README (Distributed): reduction="sum", num_items=global_num_items(micro_batches) is
    the full-batch mean; guarantees.md:84: a floating target is refused by name."""
    from crossent.torch.distributed import global_num_items

    torch.manual_seed(0)
    z = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (10,))
    y[[1, 2, 7]] = -100
    parts = [(z[:4], y[:4]), (z[4:], y[4:])]
    n = global_num_items([t for _, t in parts])
    assert int(n) == 7
    total = sum(xt.cross_entropy(a, b, reduction="sum", num_items=n) for a, b in parts)
    torch.testing.assert_close(total, F.cross_entropy(z, y), rtol=1e-13, atol=0)
    with pytest.raises(xe.InputError, match="target"):
        global_num_items(torch.zeros(3))


# --- the README's console examples ---------------------------------------------------------


def _invoke(args, **kw):
    from typer.testing import CliRunner

    from crossent.cli import app

    return CliRunner().invoke(app, args, terminal_width=120, **kw)


def test_readme_explain_examples_run_and_print_the_loss():
    """README (Command line): the two explain examples run; the binary one's loss is
    log2(1/0.7) bits (default base 2), the logits one's in nats (--base e)."""
    binary = _invoke(["explain", "--probs", "0.7", "--target", "1", "--binary"])
    assert binary.exit_code == 0, binary.output
    assert f"{math.log2(1 / 0.7):.6f}" in binary.stdout
    z = torch.tensor([[1.2, 0.3, 2.0]], dtype=torch.float64)
    ref = F.cross_entropy(z, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
                          label_smoothing=0.1).item()
    smooth = _invoke(["explain", "--logits", "1.2,0.3,2.0", "--target", "0,0,1",
                      "--label-smoothing", "0.1", "--base", "e"])
    assert smooth.exit_code == 0, smooth.output
    assert f"{ref:.6f}" in smooth.stdout


def test_readme_quiz_example_answers_the_first_four():
    """README: printf 'a\\nb\\nc\\n0.357\\n' | crossent quiz --seed 1 answers the first four;
    EOF ends it with the score. The five article questions plus two numeric ones."""
    from crossent.cli import quiz as quiz_mod

    assert len(quiz_mod.questions(1)) == 7
    assert abs(math.log(1 / 0.7) - 0.357) <= 0.005  # question 4: [0.7, 0.2, 0.1], class 0
    done = _invoke(["quiz", "--seed", "1"], input="a\nb\nc\n0.357\n")
    assert done.exit_code == 0, done.output
    assert "Score: 1/1" in done.stdout


def test_readme_plot_example_writes_an_svg(tmp_path):
    out = tmp_path / "new" / "log-loss.svg"
    done = _invoke(["plot", "log-loss", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert out.read_text(encoding="utf-8").lstrip().startswith(("<?xml", "<svg"))


# --- statements found false -----------------------------------------------------------------


def test_readme_keyword_table_holds_for_the_linear_head_too():
    """Every keyword of the table not marked as one function's is the linear head's too."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marked = {k for k in README_KEYWORDS if re.search(rf"\| `{k}=[^`]*` \(`cross_entropy`\)",
                                                     readme)}
    assert marked == {"inplace_backward"}
    params = inspect.signature(xt.linear_cross_entropy).parameters
    missing = [k for k in README_KEYWORDS if k not in params and k not in marked]
    assert not missing, missing


def _pitfalls_source() -> Path | None:
    for folder in (ROOT / "shared", ROOT.parent / "shared"):
        if (folder / "PITFALLS.md").is_file():
            return folder / "PITFALLS.md"
    return None


def test_pitfalls_table_numbers_are_pitfalls_md_items():
    source = _pitfalls_source()
    if source is None:
        pytest.skip("shared/PITFALLS.md is not next to this checkout")
    items = dict(re.findall(r"^(\d+)\. \*\*(.+?)\*\*", source.read_text(encoding="utf-8"),
                            re.M))
    table = (ROOT / "docs" / "pitfalls.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", table, re.M))
    assert sorted(set(items) - set(rows), key=int) == []
    # and row 13 is PITFALLS.md's 13 (masking with `where`), not another topic
    assert "where" in rows["13"]


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
def test_statistics_definitions_with_every_option(backend):
    """README (statistics table): with z the softcapped logits, lse = logsumexp(z), z_loss =
    z_loss * lse**2 (not class-weighted), target_logprob = log p_y (no smoothing, weights or
    z-loss), entropy = -sum p log p."""
    torch.manual_seed(3)
    logits = 8 * torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (9,))
    y[4] = -100
    w = torch.rand(6, dtype=torch.float64) + 0.5
    _, s = xt.cross_entropy(logits, y, w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                            backend=backend,
                            statistics=("lse", "z_loss", "target_logprob", "entropy"))
    z = 5.0 * torch.tanh(logits / 5.0)
    keep = y != -100
    lse = torch.logsumexp(z, 1)
    logp = torch.log_softmax(z, 1)
    torch.testing.assert_close(s.lse[keep], lse[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.z_loss[keep], 1e-3 * lse[keep] ** 2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s.target_logprob[keep],
                               logp[keep].gather(1, y[keep, None])[:, 0], rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(s.entropy[keep], -(logp.exp() * logp).sum(1)[keep],
                               rtol=1e-10, atol=1e-12)
    assert all(torch.isnan(f[4]) for f in (s.lse, s.z_loss, s.target_logprob, s.entropy))


@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float64)])
def test_wider_probability_target_promotes_the_loss_as_torch(backend, dtypes):
    """docs/guarantees.md:23: bfloat16 logits and a float32 target give a float32 loss,
    float32 and float64 a float64 one, on every route."""
    torch.manual_seed(0)
    z = torch.randn(4, 5).to(dtypes[0])
    t = torch.softmax(torch.randn(4, 5), 1).to(dtypes[1])
    ref = F.cross_entropy(z, t)
    got = xt.cross_entropy(z, t, backend=backend)
    assert got.dtype == ref.dtype == dtypes[1]
