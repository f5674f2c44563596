"""Randomized COMBINATION fuzz (H53, session 18) of ``crossent.torch.distributed`` on 2 and 3
gloo ranks: each case draws (from a seeded ``random.Random``, identical on every rank) a
random valid call (function, rows, dtype, even or uneven split with empty slices, options,
all-ignored rows, NaN / inf logits, grad_output random / 0 / inf / NaN, backward twice) and
zero, one or TWO perturbations applied on DIFFERENT ranks at once: a bad argument local to
one rank (wrong target shape, out-of-range class, float target, wrong-dtype / requires-grad
weight, non-finite num_items, meta-device target, bad option values), an option differing
from the other ranks (reduction, ignore_index, label_smoothing, z_loss, softcap, num_items,
backend, chunk_size, reduce_input_grad, vocab_start, dtype, rows), or a context on one rank
only (``torch.no_grad``, ``torch.autocast(bfloat16)``) or an equivalent spelling (int32
target, a num_items tensor of the same value, non-contiguous views).

Every rank records its outcome (returned, or the exception's type and message) and the
ranks compare them with ``all_gather_object`` AFTER the call: either every rank raised the
same exception type (each message naming an argument, or the rank that did), or every rank
returned, with the loss and this rank's gradient slices equal to single-process
``crossent.torch.cross_entropy`` / ``linear_cross_entropy`` on the gathered tensors (float64
references; NaN where they have NaN) and the same loss on every rank. Many cases run in one
group (a group costs ~0.1 s from the harness's forkserver); after each case the group must
still be usable; ``run_group``'s timeout fails a hang.

Contract violations it found (H53), each fixed in stop 18; the minimal cases below were
``xfail(strict=True)`` until then and the fuzz now asserts each pattern:

1. A rank-local :class:`crossent.UnsupportedError` (e.g. a class weight that requires grad,
   ``backend="native"``) on one rank: that rank raises ``UnsupportedError``, the others
   ``InputError("rank r of the group reported invalid input")``: different exception
   types (``_common._check_table``). Two ranks with local problems of different kinds
   likewise.
2. ``local_logits`` (``input`` for the linear head, ``target`` for ``global_num_items``)
   on the meta device on one rank: the agreement buffer is made on ``meta``
   (``_common.header_device``), that rank fails with torch's NotImplementedError /
   RuntimeError ("Cannot copy out of meta tensor") and the others wait in the agreement
   collective until gloo's timeout.
3. ``global_num_items`` with ``ignore_index`` differing across ranks returns a count mixing
   the two (``accumulate.global_num_items`` reduces only the count and a flag): no rank
   raises.
4. A rank holding no classes (``(N, 0)`` logits, an uneven split) in
   ``vocab_parallel_cross_entropy``'s backward: ``_local.grad_rows`` takes the output
   buffer for the logits themselves (two empty tensors share ``data_ptr() == 0``) and runs
   ``grad_block``'s in-place ops on a view of the caller's saved logits, bumping their
   version: a second backward (``retain_graph=True``), or any backward through an op that
   saved those logits (``tanh``, a softcap of the user's own), raises torch's "modified by
   an inplace operation" on that rank only.

Found on the way (single-process, the fuzz's reference): 5. ``crossent.torch.
linear_cross_entropy`` with ``chunk_size`` skips ignored rows when the inputs' features
are finite but the weight holds NaN/inf (``_linear._counted_rows`` /
``_chunked_head.split_rows`` check ``x`` only): ``dx``/``dW`` 0 where torch's are NaN. The
vocab-parallel head (which never skips) gives torch's NaN; the fuzz lets torch decide there.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_harness import run_group

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError

pytestmark = pytest.mark.timeout(120)

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
CASES = {2: 105, 3: 50}


# ------------------------------------------------------------------ case generation ----

def _sizes(rng: random.Random, world: int) -> tuple[list[int], bool]:
    """Per-rank class counts and whether the split is even (vocab_start None)."""
    if rng.random() < 0.5:
        return [rng.choice([1, 2, 3])] * world, True
    sizes = [rng.choice([0, 1, 2, 3, 4]) for _ in range(world)]
    if not sum(sizes):
        sizes[rng.randrange(world)] = 2
    return sizes, False


def _starts(sizes: list[int], rng: random.Random) -> list[int]:
    starts, end = [], 0
    for n in sizes:
        starts.append(end)
        end += n
    # an empty slice may sit anywhere in [0, V]
    return [s if n else rng.randint(0, end) for s, n in zip(starts, sizes, strict=True)]


def _draw(seed: int, world: int) -> dict:
    """One case: everything every rank needs, drawn identically on every rank."""
    rng = random.Random(seed)
    fn = rng.choices(["ce", "lin", "gni"], [5, 4, 1])[0]
    sizes, even = _sizes(rng, world)
    vocab = sum(sizes)
    rows = rng.choice([0, 1, 3, 5, 5, 6])
    dtype = rng.choices([F64, F32, BF16], [7, 2, 1])[0]
    ignore = rng.choice([-100, -100, -1, 0])
    reduction = rng.choice(["mean", "sum", "none"])
    num_items = None
    if reduction == "sum" and rng.random() < 0.5:
        num_items = rng.choice([3.0, 7, "tensor"])
    opts = dict(ignore_index=ignore, reduction=reduction,
                label_smoothing=rng.choice([0.0, 0.0, 0.1]),
                z_loss=rng.choice([0.0, 0.0, 1e-2]),
                softcap=rng.choice([None, None, 3.0]),
                backend=rng.choice(["auto", "rowblock"]))
    case = dict(seed=seed, fn=fn, sizes=sizes, even=even, starts=_starts(sizes, rng),
                vocab=vocab, rows=rows, dtype=dtype, opts=opts, num_items=num_items,
                weighted=rng.random() < 0.35, all_ignored=rng.random() < 0.1,
                data=rng.choice([None] * 6 + ["nan", "inf", "zero-weight", "nan-weight",
                                              "nan-x"]),
                data_rank=rng.randrange(world),
                go=rng.choice(["one", "random", "zero", "inf", "nan"]),
                twice=rng.random() < 0.12,
                chunk=rng.choice([None, 1, 2, 4]), bias=rng.random() < 0.5,
                features=rng.choice([1, 3]), x_grad=rng.random() < 0.7,
                reduce_input_grad=rng.random() < 0.8, gni_list=rng.random() < 0.5)
    k = rng.choices([0, 1, 2], [4, 3, 3])[0]
    ranks = rng.sample(range(world), k)
    menu = _menu(case)
    # distinct perturbations: one applied to every rank alike would be no disagreement
    case["perturb"] = list(zip(ranks, rng.sample(menu, k), strict=True))
    return case


def _tensors(case: dict) -> dict:
    """The full (gathered) tensors of a case, identical on every rank."""
    g = torch.Generator().manual_seed(case["seed"])
    n, v, dt = case["rows"], case["vocab"], case["dtype"]
    ignore = case["opts"]["ignore_index"]
    t = torch.randint(0, max(v, 1), (n,), generator=g)
    drop = torch.rand(n, generator=g) < 0.25
    t = torch.where(drop, ignore, t) if ignore < 0 else t
    if case["all_ignored"]:
        t = torch.full((n,), ignore, dtype=torch.int64)
    full = torch.randn(n, v, generator=g, dtype=F64).mul(2).to(dt)
    x = torch.randn(n, case["features"], generator=g, dtype=F64).to(dt)
    w = torch.randn(v, case["features"], generator=g, dtype=F64).to(dt)
    b = torch.randn(v, generator=g, dtype=F64).to(dt)
    cw = (torch.rand(v, generator=g, dtype=F64) + 0.5).to(dt)
    lo = case["starts"][case["data_rank"]]
    owned = case["sizes"][case["data_rank"]]
    if case["data"] in ("nan", "inf") and owned and n:
        bad = math.nan if case["data"] == "nan" else math.inf
        row = int(torch.randint(0, n, (1,), generator=g))
        full[row, lo] = bad
        w[lo, 0] = bad if case["data"] == "nan" else w[lo, 0]
    if case["data"] == "nan-x" and n:  # the same hidden state on every rank
        x[int(torch.randint(0, n, (1,), generator=g)), 0] = math.nan
    if case["data"] in ("zero-weight", "nan-weight") and v:
        cw[int(torch.randint(0, v, (1,), generator=g))] = (
            0.0 if case["data"] == "zero-weight" else math.nan)
    go = {"one": 1.0, "random": 0.7, "zero": 0.0, "inf": math.inf, "nan": math.nan}[case["go"]]
    if case["opts"]["reduction"] == "none":
        gvec = torch.randn(n, generator=g, dtype=F64)
        if n and case["go"] in ("zero", "inf", "nan"):
            gvec[int(torch.randint(0, n, (1,), generator=g))] = go
        go_t = gvec
    else:
        go_t = torch.tensor(go, dtype=F64)
    return dict(t=t, full=full, x=x, w=w, b=b, cw=cw, go=go_t)


# ------------------------------------------------------------------ perturbations ----
# (name, expect, words, apply(kw, case, data) -> kw). expect: "raise" | "ok" | "either".
# ``words``: what a raising rank's message may name (besides "rank r ..." and "differs").
# A perturbation applies to ONE rank's keyword arguments; "ctx:" ones wrap its call.

def _menu(case: dict) -> list[tuple]:
    fn = case["fn"]
    red = case["opts"]["reduction"]
    other = {"mean": "sum", "sum": "none", "none": "mean"}[red]
    flip = {"auto": "rowblock", "rowblock": "auto"}[case["opts"]["backend"]]

    def put(**changes):
        return lambda kw, c, d: {**kw, **changes}

    if fn == "gni":
        return [
            ("gni float target", "raise", ["integer"],
             lambda kw, c, d: {**kw, "target": d["t"].double()}),
            ("gni ignore_index 1.5", "raise", ["ignore_index"], put(ignore_index=1.5)),
            ("gni not a list", "raise", ["target"], put(target=5)),
            ("gni empty list", "raise", ["target"], put(target=[])),
            ("gni bool target", "raise", ["integer"],
             lambda kw, c, d: {**kw, "target": d["t"] > 0}),
            ("gni int32 target", "ok", [],
             lambda kw, c, d: {**kw, "target": d["t"].to(torch.int32)}),
            # known bug 3, fixed: an ignore_index differing across ranks raises together
            ("gni ignore_index differs", "raise", ["ignore_index"], put(ignore_index=-7)),
        ]
    common = [
        ("target shape", "raise", ["target"],
         lambda kw, c, d: {**kw, "target": d["t"][:-1] if c["rows"] else d["t"].new_zeros(1)}),
        ("target float", "raise", ["integer"],
         lambda kw, c, d: {**kw, "target": d["t"].double()}),
        ("target meta", "raise", ["target"], lambda kw, c, d: {**kw, "target": d["t"].to("meta")}),
        ("target out of range", "raise" if case["rows"] else "ok", ["target"],
         lambda kw, c, d: {**kw, "target": _out_of_range(d["t"], c)}),
        ("target int32", "ok", [], lambda kw, c, d: {**kw, "target": d["t"].to(torch.int32)}),
        ("target uint8", "ok", [], lambda kw, c, d: kw if c["vocab"] > 255 or bool(
            (d["t"] < 0).any()) else {**kw, "target": d["t"].to(torch.uint8)}),
        ("backend triton", "raise", ["triton", "TRITON"], put(backend="triton")),
        ("weight meta", "raise", ["weight"],
         lambda kw, c, d: {**kw, "weight": _slice(d["cw"], c, kw).to("meta")}),
        # the same values, spelled differently on one rank
        ("ignore_index as a 0-d tensor", "ok", [],
         lambda kw, c, d: {**kw, "ignore_index": torch.tensor(kw["ignore_index"])}),
        ("vocab_start as numpy", "ok", [], lambda kw, c, d: kw if kw["vocab_start"] is None
         else {**kw, "vocab_start": np.int64(kw["vocab_start"])}),
        ("label_smoothing as numpy", "ok", [],
         lambda kw, c, d: {**kw, "label_smoothing": np.float64(kw["label_smoothing"])}),
        ("softcap as int", "ok", [], lambda kw, c, d: kw if kw["softcap"] is None
         else {**kw, "softcap": int(kw["softcap"])}),
        ("weight wrong dtype", "raise", ["weight"],
         lambda kw, c, d: {**kw, "weight": _slice(d["cw"], c, kw).to(
             F32 if c["dtype"] == F64 else F64)}),
        ("weight requires grad", "raise", ["weight"],
         lambda kw, c, d: {**kw, "weight": _slice(d["cw"], c, kw).clone().requires_grad_()}),
        ("weight shape", "raise", ["weight"],
         lambda kw, c, d: {**kw, "weight": torch.ones(kw["_size"] + 1, dtype=c["dtype"])}),
        ("weight presence", "raise", ["weight"],
         lambda kw, c, d: {**kw, "weight": None if kw.get("weight") is not None
                           else _slice(d["cw"], c, kw)}),
        ("num_items inf", "raise", ["num_items"], put(num_items=math.inf)),
        ("num_items nan tensor", "raise", ["num_items"], put(num_items=torch.tensor(math.nan))),
        ("num_items requires grad", "raise", ["num_items"],
         put(num_items=torch.tensor(3.0, requires_grad=True))),
        ("num_items other value", "raise", ["num_items"], put(num_items=11.0)),
        ("num_items same value as a tensor", "ok", [],
         lambda kw, c, d: {**kw, "num_items": torch.tensor(float(kw["num_items"]))}
         if kw.get("num_items") is not None and not isinstance(kw["num_items"], torch.Tensor)
         else kw),
        ("reduction bogus", "raise", ["reduction"], put(reduction="avg")),
        ("reduction other", "raise", ["reduction", "num_items"], put(reduction=other)),
        ("ignore_index other", "raise", ["ignore_index"], put(ignore_index=-7)),
        ("ignore_index 1.5", "raise", ["ignore_index"], put(ignore_index=1.5)),
        ("label_smoothing 1.5", "raise", ["label_smoothing"], put(label_smoothing=1.5)),
        ("label_smoothing other", "raise", ["label_smoothing"], put(label_smoothing=0.25)),
        ("z_loss negative", "raise", ["z_loss"], put(z_loss=-1.0)),
        ("z_loss other", "raise", ["z_loss"], put(z_loss=0.5)),
        ("softcap zero", "raise", ["softcap"], put(softcap=0.0)),
        ("softcap other", "raise", ["softcap"],
         put(softcap=None if case["opts"]["softcap"] else 2.0)),
        ("backend bogus", "raise", ["backend"], put(backend="bogus")),
        ("backend native", "raise", ["native"], put(backend="native")),
        ("backend other", "raise", ["backend"], put(backend=flip)),
        ("vocab_start -1", "raise", ["vocab_start"], put(vocab_start=-1)),
        ("vocab_start 1.5", "raise", ["vocab_start"], put(vocab_start=1.5)),
        ("vocab_start toggled", "raise", ["vocab_start", "classes"],
         lambda kw, c, d: {**kw, "vocab_start": kw["_start"] if kw["vocab_start"] is None
                           else None}),
        ("dtype other", "raise", ["dtype", "weight", "local_"], "dtype"),
        ("rows other", "raise", ["rows", "target"], "rows"),
        ("ctx:no_grad", "ok" if fn == "ce" else "either", ["requires_grad"], "no_grad"),
        ("ctx:autocast", "either", ["dtype", "weight"], "autocast"),
    ]
    if fn == "ce":
        return [
            *common,
            ("logits None", "raise", ["local_logits"], put(local_logits=None)),
            ("logits int", "raise", ["local_logits"],
             lambda kw, c, d: {**kw, "local_logits": kw["local_logits"].long()}),
            ("logits without grad", "ok", [], put(_frozen=True)),
            ("logits non-contiguous", "ok", [],
             lambda kw, c, d: {**kw, "local_logits": kw["local_logits"].t().contiguous().t()}),
        ]
    return [
        *common,
        ("chunk_size 0", "raise", ["chunk_size"], put(chunk_size=0)),
        ("chunk_size other", "raise", ["chunk_size"],
         put(chunk_size=None if case["chunk"] else 3)),
        ("reduce_input_grad other", "raise", ["reduce_input_grad"],
         put(reduce_input_grad=not case["reduce_input_grad"])),
        ("reduce_input_grad str", "raise", ["reduce_input_grad"], put(reduce_input_grad="yes")),
        ("local_weight dtype", "raise", ["local_weight", "dtype"],
         lambda kw, c, d: {**kw, "local_weight": kw["local_weight"].detach().to(
             F32 if c["dtype"] == F64 else F64)}),
        ("local_bias shape", "raise", ["local_bias"],
         lambda kw, c, d: {**kw, "local_bias": torch.zeros(kw["_size"] + 1, dtype=c["dtype"])}),
        ("input features", "raise", ["input", "D "],
         lambda kw, c, d: {**kw, "input": torch.zeros(c["rows"], c["features"] + 1,
                                                     dtype=c["dtype"])}),
    ]


def _slice(full_weight, case, kw):
    return full_weight[kw["_start"]:kw["_start"] + kw["_size"]]


def _out_of_range(t, case):
    t = t.clone()
    if t.numel():
        t[0] = case["vocab"] + 1
    return t


# ------------------------------------------------------------------ one call ----

def _base_kwargs(case, data, rank):
    start, size = case["starts"][rank], case["sizes"][rank]
    opts = dict(case["opts"])
    if case["num_items"] is not None:
        opts["num_items"] = (torch.tensor(5.0) if case["num_items"] == "tensor"
                             else case["num_items"])
    kw = dict(vocab_start=None if case["even"] else start, _start=start, _size=size, **opts)
    if case["weighted"]:
        kw["weight"] = data["cw"][start:start + size]
    if case["fn"] == "ce":
        kw["local_logits"] = data["full"][:, start:start + size]
        kw["target"] = data["t"]
    elif case["fn"] == "lin":
        kw["input"] = data["x"]
        kw["local_weight"] = data["w"][start:start + size]
        kw["local_bias"] = data["b"][start:start + size] if case["bias"] else None
        kw["target"] = data["t"]
        kw["chunk_size"] = case["chunk"]
        kw["reduce_input_grad"] = case["reduce_input_grad"]
    else:
        t = data["t"]
        kw = dict(target=[t[:2], t[2:]] if case["gni_list"] else t,
                  ignore_index=case["opts"]["ignore_index"])
    return kw


def _apply(kw, case, data, perturbation):
    how = perturbation[3]
    if callable(how):
        return how(kw, case, data), None
    if how == "dtype":
        other = F32 if case["dtype"] == F64 else F64
        keys = ("local_logits",) if case["fn"] == "ce" else ("input", "local_weight",
                                                               "local_bias")
        kw = {**kw, **{k: kw[k].to(other) for k in keys if kw.get(k) is not None}}
        if kw.get("weight") is not None:
            kw["weight"] = kw["weight"].to(other)
        return kw, None
    if how == "rows":
        key = "local_logits" if case["fn"] == "ce" else "input"
        extra = kw[key][:1] if case["rows"] else torch.zeros(1, kw[key].shape[1],
                                                           dtype=kw[key].dtype)
        t = kw["target"]
        return {**kw, key: torch.cat([kw[key], extra]),
                "target": torch.cat([t, t.new_zeros(1)])}, None
    return kw, how  # a context


def _context(how):
    if how == "no_grad":
        return torch.no_grad()
    if how == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _leaves(kw, case):
    """Make the differentiable inputs leaves that require grad (what backward checks)."""
    kw = dict(kw)
    if case["fn"] == "ce" and isinstance(kw.get("local_logits"), torch.Tensor) and \
            kw["local_logits"].is_floating_point():
        kw["local_logits"] = kw["local_logits"].detach().clone().requires_grad_(
            not kw.get("_frozen"))
    if case["fn"] == "lin":
        for k in ("input", "local_weight", "local_bias"):
            v = kw.get(k)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                need = case["x_grad"] if k == "input" else True
                kw[k] = v.detach().clone().requires_grad_(need)
    return kw


def _call(case, kw):
    from crossent.torch.distributed import (
        global_num_items,
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    kw = {k: v for k, v in kw.items() if not k.startswith("_")}
    if case["fn"] == "ce":
        return vocab_parallel_cross_entropy(kw.pop("local_logits"), kw.pop("target"), **kw)
    if case["fn"] == "lin":
        return vocab_parallel_linear_cross_entropy(kw.pop("input"), kw.pop("local_weight"),
                                                   kw.pop("target"), **kw)
    return global_num_items(**kw)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------ references ----

def _reference(case, data, ctx):
    """Single-process crossent.torch on the gathered float64 tensors: (loss, grads dict)."""
    o = dict(case["opts"])
    o.pop("backend")
    if case["num_items"] is not None:
        o["num_items"] = (torch.tensor(5.0, dtype=F64) if case["num_items"] == "tensor"
                          else case["num_items"])
    cw = data["cw"].to(F64) if case["weighted"] else None
    t = data["t"]
    if case["fn"] == "gni":
        return torch.tensor(int((t != o["ignore_index"]).sum())), {}
    with _context(ctx):
        if case["fn"] == "ce":
            z = data["full"].to(F64).requires_grad_()
            ref = xt.cross_entropy(z, t, cw, **o)
            leaves = {"local_logits": z}
        else:
            x = data["x"].to(F64).requires_grad_()
            w = data["w"].to(F64).requires_grad_()
            b = data["b"].to(F64).requires_grad_() if case["bias"] else None
            ref = xt.linear_cross_entropy(x, w, t, b, weight=cw, **o)
            leaves = {"input": x, "local_weight": w, "local_bias": b}
    grads = {}
    if ref.requires_grad:
        live = {k: v for k, v in leaves.items() if v is not None}
        got = torch.autograd.grad(ref, list(live.values()), data["go"].reshape(ref.shape))
        grads = dict(zip(live, got, strict=True))
    return ref.detach(), grads


def _close(got, want, dtype, what):
    tol = {F64: 1e-9, F32: 2e-4}.get(dtype, 2e-2)
    torch.testing.assert_close(got.detach().to(F64), want.to(F64), rtol=tol, atol=tol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ the fuzz loop ----

def _gather(value, world, group=None):
    seen = [None] * world
    dist.all_gather_object(seen, value, group=group)
    return seen


def _one_case(rank, world, seed, stats):
    case = _draw(seed, world)
    data = _tensors(case)
    kw = _base_kwargs(case, data, rank)
    ctx = None
    mine = [p for r, p in case["perturb"] if r == rank]
    for p in mine:
        kw, c = _apply(kw, case, data, p)
        ctx = c or ctx
    kw = _leaves(kw, case)
    names = [p[0] for _, p in case["perturb"]]
    expects = {p[1] for _, p in case["perturb"]}
    words = [w for _, p in case["perturb"] for w in p[2]]
    if case["data"] == "nan-weight" and case["weighted"]:
        expects.add("either")  # with smoothing: UnsupportedError on every rank (documented)
        words.append("label_smoothing")
    what = (seed, case["fn"], case["sizes"], case["opts"], names)

    result, error = None, None
    try:
        with _context(ctx):
            result = _call(case, kw)
    except Exception as e:  # compared across the ranks below
        error = e
    here = "returned" if error is None else _describe(error)
    seen = _gather(here, world)
    raised = [not s.startswith("returned") for s in seen]
    if any(raised):
        types = {s.split(":")[0] for s in seen}
        assert all(raised), (what, "some ranks returned", seen)
        # known bug 1, fixed: one exception type on every rank
        # (test_unsupported_problem_on_one_rank_same_type_everywhere)
        assert len(types) == 1, (what, "different exception types", seen)
        assert types <= {"InputError", "UnsupportedError"}, (what, "not crossent's", seen)
        assert expects & {"raise", "either"}, (what, "a valid call raised", seen)
        for s in seen:  # names an argument, or the rank that did
            assert any(w in s for w in [*words, "rank ", "differs"]), (what, s)
        stats["raised"] += 1
        return
    assert "raise" not in expects, (what, "every rank returned", seen)
    stats["returned"] += 1
    # the same value on every rank, and single-process crossent's
    values = _gather(result.detach().to(F64).tolist(), world)
    # a rank under autocast returns float32 where the others return bfloat16
    tol = 2e-2 if case["dtype"] == BF16 else 2e-4
    for v in values[1:]:
        torch.testing.assert_close(torch.tensor(v, dtype=F64), torch.tensor(values[0],
                                   dtype=F64), equal_nan=True, rtol=tol, atol=tol,
                                   msg=lambda m: f"{what}: ranks disagree: {m}")
    ref, grads = _reference(case, data, ctx)
    # the tolerance of the loosest dtype in play (autocast: float32 loss, bf16 gradient)
    dtype = F32 if ctx == "autocast" and case["dtype"] != BF16 else case["dtype"]
    if case["fn"] == "gni":
        assert int(result) == int(ref) * world, (what, int(result), int(ref))
        return
    _close(result, ref, dtype, (what, "loss"))
    _check_grads(rank, world, case, data, kw, result, grads, dtype, what, stats)


def _check_grads(rank, world, case, data, kw, result, grads, dtype, what, stats):
    wants_grad = _gather(bool(result.requires_grad), world)
    if not any(wants_grad):
        return
    if not all(wants_grad):
        # no_grad on some rank only: the others' backward must make no collective
        assert case["fn"] == "ce" or not (case["x_grad"] and case["reduce_input_grad"]), what
    go = data["go"].to(result.dtype).reshape(result.shape)
    leaves = {k: v for k, v in kw.items() if k in ("local_logits", "input", "local_weight",
                                                   "local_bias")
              and isinstance(v, torch.Tensor) and v.requires_grad}
    times = 2 if case["twice"] else 1
    outcomes = []
    if result.requires_grad:
        for i in range(times):
            try:
                result.backward(go, retain_graph=i + 1 < times)
                outcomes.append("ok")
            except RuntimeError as e:  # the linear head's stored gradient, consumed once
                outcomes.append(f"RuntimeError: {str(e)[:60]}")
    seen = _gather(outcomes, world)
    mine = [s for s, g in zip(seen, wants_grad, strict=True) if g]
    # known bug 4, fixed: test_rank_without_classes_keeps_its_logits_unmodified
    assert all(s == mine[0] for s in mine), (what, "backward", seen)
    if not result.requires_grad or outcomes[-1] != "ok":
        if outcomes and outcomes[-1] != "ok":
            assert case["fn"] == "lin" and case["opts"]["reduction"] != "none", (what, seen)
            stats["backward twice refused"] += 1
        return
    start, size = case["starts"][rank], case["sizes"][rank]
    for k, leaf in leaves.items():
        want = grads[k]
        if k != "input":
            want = want[:, start:start + size] if k == "local_logits" else want[start:start + size]
        got = leaf.grad
        if k == "input" and not case["reduce_input_grad"]:
            if not all(wants_grad):  # the sum below is a collective: every rank or none
                continue
            got = got.clone()
            dist.all_reduce(got)  # this rank's partial G_r W_r: summed over the group
        # known bug 5, fixed: the single-process reference keeps torch's NaN on ignored
        # rows of a weight holding NaN/inf
        # (test_single_process_linear_head_keeps_torchs_nan_on_ignored_rows)
        _close(got, want * times, dtype, (what, "grad", k))
    stats["gradients checked"] += 1


def _fuzz(rank, world, first, count):
    from collections import Counter

    stats: Counter = Counter()
    for seed in range(first, first + count):
        _one_case(rank, world, seed, stats)
        # the group is still usable: a collective every rank makes
        ping = torch.ones(1)
        dist.all_reduce(ping)
        assert int(ping) == world, (seed, "the group broke")
    if rank == 0:
        print(f"world {world}: {count} cases, {dict(stats)}")


@pytest.mark.parametrize("world", [2, 3])
def test_combination_fuzz(world):
    """Random valid calls with one or two perturbations on different ranks: every rank
    raises the same type or every rank returns single-process crossent's loss and
    gradient slices; nothing hangs; the group stays usable."""
    run_group(_fuzz, world, 1000 * world, CASES[world], timeout=90)


# ------------------------------------------------------------------ known bugs ----

def _unsupported_on_one_rank(rank, world):
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    z = torch.zeros(2, 3, dtype=F64)
    t = torch.tensor([0, 1])
    w = torch.ones(3, dtype=F64, requires_grad=rank == 0)  # UnsupportedError on rank 0
    try:
        vocab_parallel_cross_entropy(z, t, weight=w)
        here = "returned"
    except (InputError, UnsupportedError) as e:
        here = type(e).__name__
    seen = _gather(here, world)
    assert len(set(seen)) == 1 and seen[0] != "returned", seen


def test_unsupported_problem_on_one_rank_same_type_everywhere():
    """Rank 0 passes a class weight that requires grad (UnsupportedError there): rank 1
    must raise the same type; it raises InputError."""
    run_group(_unsupported_on_one_rank, 2, timeout=30)


def _meta_first_tensor(rank, world):
    from crossent.torch.distributed import (
        global_num_items,
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    z = torch.zeros(2, 3, dtype=F64)
    x, w = torch.zeros(2, 4, dtype=F64), torch.zeros(3, 4, dtype=F64)
    t = torch.tensor([0, 1])

    def meta(a):
        return a.to("meta") if rank == 0 else a

    calls = {
        "ce": lambda g: vocab_parallel_cross_entropy(meta(z), t, group=g),
        "lin": lambda g: vocab_parallel_linear_cross_entropy(meta(x), w, t, group=g),
        "gni": lambda g: global_num_items(meta(t), group=g),
    }
    problems = []
    for name, call in calls.items():
        # a fresh subgroup with a short collective timeout per call: a rank left waiting
        # fails in 0.5 s, and a broken subgroup does not spoil the next call
        short = dist.new_group(list(range(world)),
                               timeout=datetime.timedelta(milliseconds=500))
        try:
            call(short)
            here = "returned"
        except Exception as e:  # torch's NotImplementedError / gloo's timeout: the bug
            here = _describe(e)[:80]
        seen = _gather(here, world)
        if not all(s.startswith(("InputError", "UnsupportedError")) for s in seen) or \
                len({s.split(":")[0] for s in seen}) > 1:
            problems.append((name, seen))
    assert not problems, problems


def test_meta_first_tensor_on_one_rank_raises_together():
    """``local_logits`` / ``input`` / ``target`` (global_num_items) on the meta device on
    rank 0 only: every rank must raise crossent's error (naming the argument); rank 0
    raises torch's "Cannot copy out of meta tensor", rank 1 gloo's timeout."""
    run_group(_meta_first_tensor, 2, timeout=30)


def _gni_ignore_index_differs(rank, world):
    from crossent.torch.distributed import global_num_items

    t = torch.tensor([0, -1, -100, 2])
    try:
        here = f"returned {int(global_num_items(t, ignore_index=-100 if rank == 0 else -1))}"
    except InputError as e:
        here = f"InputError: {e}"
    seen = _gather(here, world)
    assert all(s.startswith("InputError") and "ignore_index" in s for s in seen), seen


def test_global_num_items_ignore_index_differing_raises_together():
    """Rank 0 counts with ignore_index=-100, rank 1 with -1: the 'global' count (3 + 3)
    mixes the two; every rank should raise InputError naming ignore_index."""
    run_group(_gni_ignore_index_differs, 2, timeout=30)


def _empty_slice_backward(rank, world):
    from crossent.torch.distributed import vocab_parallel_cross_entropy

    full = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([0, 1, 2, 1])
    lo, hi = (0, 3) if rank == 0 else (3, 3)  # rank 1 holds no classes
    a = full[:, lo:hi].clone().requires_grad_()
    try:
        vocab_parallel_cross_entropy(a.tanh(), t, vocab_start=lo).backward()
        here = "ok"
    except RuntimeError as e:
        here = f"RuntimeError: {str(e)[:60]}"
    seen = _gather(here, world)
    assert seen == ["ok"] * world, seen
    ref = full.clone().requires_grad_()
    xt.cross_entropy(ref.tanh(), t).backward()
    torch.testing.assert_close(a.grad, ref.grad[:, lo:hi])


def test_rank_without_classes_keeps_its_logits_unmodified():
    """Uneven split [3, 0]; the logits come through ``tanh`` (which saves its output):
    backward must work on every rank as single-process; rank 1 raises torch's
    'modified by an inplace operation'."""
    run_group(_empty_slice_backward, 2, timeout=30)


def test_single_process_linear_head_keeps_torchs_nan_on_ignored_rows():
    """One ignored row, a NaN in the weight, ``chunk_size=2``: torch's dx and dW are NaN
    (log_softmax's backward of NaN logits); crossent's are 0."""
    import torch.nn.functional as F

    x, w = torch.ones(1, 2, dtype=F64), torch.ones(2, 2, dtype=F64)
    w[1, 0] = math.nan
    t = torch.tensor([-100])
    mine = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    theirs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    xt.linear_cross_entropy(*mine, t, reduction="none", chunk_size=2).sum().backward()
    F.cross_entropy(F.linear(*theirs), t, reduction="none").sum().backward()
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
