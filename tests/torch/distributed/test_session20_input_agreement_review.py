"""Adversarial review of 102ea4e: vocab_parallel_linear_cross_entropy hashes ``input`` into the
agreement table (``_common.input_hashes``), so a rank fed other hidden states raises on every
rank.

Checked on 2 and 3 gloo ranks (one launch per world size, every probe's outcome gathered from
every rank): equal values held differently on each rank pass and give torch's float64 loss
(expanded stride-0 rows, (B, T, D) views of permuted and channels-last-like storage, -0.0 vs
0.0 and NaN payloads in all four float dtypes, a non-leaf view needing a gradient, N=0, D=1,
D=70000 with different thread counts per rank and words of maximal magnitude, autocast,
inference_mode); single-bit and simple structural differences raise "input differs" on every
rank. The review found differences the first hash could not see (it was linear within a
row with one key sequence, its keys repeated every 65521 words, and target_hashes mapped a row
sum ``m 2^31`` and ``m 2^31 + 2^31 - 1`` alike) and the hang that target_hashes collision
caused for an out-of-range target on one rank; fixed at stop 29, they are plain tests now.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_group

from crossent.errors import InputError
from crossent.torch.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(180)

N, D, VR = 6, 4, 3  # rows, features, classes per rank
BIG_D = 70000
_ITYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
          torch.float32: torch.int32, torch.float64: torch.int64}
# two NaNs per dtype: the quiet default, and a negative signalling one with a payload
_NANS = {torch.float16: (0x7E00, 0xFC01 - (1 << 16)),
         torch.bfloat16: (0x7FC0, 0xFF81 - (1 << 16)),
         torch.float32: (0x7FC00000, 0xFF800001 - (1 << 32)),
         torch.float64: (0x7FF8000000000000, 0xFFF0000000000001 - (1 << 64))}


def _data(world, dtype=torch.float64, n=N, d=D, seed=3):
    g = torch.Generator().manual_seed(seed)  # the same on every rank
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(VR * world, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, VR * world, (n,), generator=g)
    return x.to(dtype), w.to(dtype), t


def _head(x, w, t, rank, **kw):
    lo = VR * rank
    return vocab_parallel_linear_cross_entropy(x, w[lo:lo + VR], t, **kw)


def _ref(x, w, t, **kw):  # torch in float64 on the whole head
    return F.cross_entropy(F.linear(x.double(), w.double()), t, **kw)


def _close(got, want, low=False):
    tol = {True: dict(rtol=1e-2, atol=1e-2), False: dict(rtol=1e-9, atol=1e-9),
           "f32": dict(rtol=1e-5, atol=1e-5)}[low]
    torch.testing.assert_close(got.double(), want.double(), equal_nan=True, **tol)


def _layout(x, rank):
    """The same values, held in another layout on each rank."""
    return [x, x.t().contiguous().t(), torch.stack([x, x], 1)[:, 1]][rank % 3]


def _bits(x, at, value):  # x (a copy) with the bits of x[at] set to ``value``
    x = x.clone()
    x.view(_ITYPE[x.dtype])[at] = value
    return x


# ---------------------------------------------------------------- equal values: must pass


def _pass_expanded(rank, world):
    x, w, t = _data(world)
    row = x[:1]
    held = [row.expand(N, D), row.repeat(N, 1), torch.cat([row.repeat(N, 1)] * 2, 1)[:, D:]]
    _close(_head(held[rank % 3], w, t, rank, reduction="none"),
           _ref(row.repeat(N, 1), w, t, reduction="none"))


def _pass_3d_views(rank, world):
    b, s = 2, 3
    x, w, t = _data(world, n=b * s)
    base = x.reshape(b, s, D)
    held = [base, base.transpose(0, 1).contiguous().transpose(0, 1),
            base.permute(0, 2, 1).contiguous().permute(0, 2, 1)][rank % 3]  # channels-last-like
    assert held.shape == base.shape
    got = _head(held, w, t.reshape(b, s), rank, reduction="none")
    _close(got.reshape(-1), _ref(x, w, t, reduction="none"))


def _pass_zero_sign_nan_payload(dtype):
    def probe(rank, world):
        x, w, t = _data(world, dtype)
        x[0, 0] = 0.0
        x = _bits(x, (1, 2), _NANS[dtype][0])
        want = _ref(x, w, t, reduction="none")
        if rank == world - 1:
            x[0, 0] = -0.0
            x = _bits(x, (1, 2), _NANS[dtype][1])
            assert torch.isnan(x[1, 2]) and math.copysign(1.0, float(x[0, 0])) < 0
        got = _head(_layout(x, rank), w, t, rank, reduction="none")
        _close(got, want, low={torch.float64: False, torch.float32: "f32"}.get(dtype, True))
        assert torch.isnan(got[1]) and not torch.isnan(got[0])
    return probe


def _pass_nonleaf_view_grad(rank, world):
    x, w, t = _data(world)
    leaf = x.clone().requires_grad_()
    held = [leaf * 1.0, leaf.t().contiguous().t(), torch.cat([leaf, leaf], 1)[:, :D]][rank % 3]
    assert not held.is_leaf
    lo = VR * rank
    lw = w[lo:lo + VR].clone().requires_grad_()
    vocab_parallel_linear_cross_entropy(held, lw, t).backward()
    rx, rw = x.clone().requires_grad_(), w.clone().requires_grad_()
    _ref(rx, rw, t).backward()
    _close(leaf.grad, rx.grad)
    _close(lw.grad, rw.grad[lo:lo + VR])


def _pass_empty(rank, world):
    _, w, _ = _data(world)
    x = [torch.empty(0, D, dtype=torch.float64),
         torch.empty(D, 0, dtype=torch.float64).t(),
         torch.empty(0, 2 * D, dtype=torch.float64)[:, D:]][rank % 3]
    t = torch.empty(0, dtype=torch.int64)
    _close(_head(x, w, t, rank, reduction="sum"), _ref(x, w, t, reduction="sum"))
    _close(_head(x, w, t, rank), _ref(x, w, t))  # mean over nothing: NaN, as torch's


def _pass_d1(rank, world):
    x, w, t = _data(world, d=1)
    held = [x, torch.cat([x, x], 1)[:, 1:], x.expand(N, 1).clone()][rank % 3]
    _close(_head(held, w, t, rank, reduction="none"), _ref(x, w, t, reduction="none"))


def _big(world):
    """(2, 70000) float64 whose first half has every 16-bit word -16384 (-2.0000...: each
    row's key-weighted word sum is about -1.9e13, far past float32's exact integers); the
    other half random."""
    x, w, t = _data(world, n=2, d=BIG_D, seed=4)
    x[:, :BIG_D // 2] = struct.unpack("<d", struct.pack("<4h", *[-16384] * 4))[0]
    return x, w, t


def _pass_big_d_threads(rank, world):
    x, w, t = _big(world)
    torch.set_num_threads(1 + rank % 2)  # reset to 1 by the driver
    held = [x, torch.cat([x, x], 1)[:, BIG_D:], x.t().contiguous().t()][rank % 3]
    _close(_head(held, w, t, rank, reduction="none"), _ref(x, w, t, reduction="none"))


def _pass_autocast(rank, world):
    x, w, t = _data(world, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _head(_layout(x, rank), w, t, rank, reduction="none")
    # torch's head on the bfloat16 operands autocast hands to linear, in float64
    want = _ref(x.bfloat16(), w.bfloat16(), t, reduction="none")
    assert got.dtype == torch.float32
    _close(got, want, low=True)


def _pass_inference_mode(rank, world):
    with torch.inference_mode():
        x, w, t = _data(world)
        _close(_head(_layout(x, rank), w, t, rank, reduction="none"),
               _ref(x, w, t, reduction="none"))


PASS = {
    "expanded stride-0 rows": _pass_expanded,
    "(B,T,D) views of permuted / channels-last-like storage": _pass_3d_views,
    "float16 -0.0 and NaN payloads": _pass_zero_sign_nan_payload(torch.float16),
    "bfloat16 -0.0 and NaN payloads": _pass_zero_sign_nan_payload(torch.bfloat16),
    "float32 -0.0 and NaN payloads": _pass_zero_sign_nan_payload(torch.float32),
    "float64 -0.0 and NaN payloads": _pass_zero_sign_nan_payload(torch.float64),
    "non-leaf views needing a gradient": _pass_nonleaf_view_grad,
    "N=0": _pass_empty,
    "D=1": _pass_d1,
    "D=70000, other thread counts per rank": _pass_big_d_threads,
    "autocast bfloat16": _pass_autocast,
    "inference_mode": _pass_inference_mode,
}


# ------------------------------------------------ one rank differs: must raise on every rank


def _differ(make, odd=-1, **data):
    """``make(x) -> x'`` on one rank (the last by default), the base on the others."""
    def probe(rank, world):
        x, w, t = _data(world, **data)
        if rank == odd % world:
            x = make(x)
        _head(x, w, t, rank)
    return probe


def _low_bit(dtype):
    def make(x):
        return _bits(x, (4, 1), x.view(_ITYPE[dtype])[4, 1] ^ 1)
    return _differ(make, dtype=dtype)


def _set(at, value):
    def make(x):
        x = x.clone()
        x[at] = value
        return x
    return make


def _differ_zero_row(rank, world):
    x, w, t = _data(world)
    x[0] = 0.0
    if rank == world - 1:
        x = _bits(x, (0, 2), 1)  # the smallest subnormal
    _head(x, w, t, rank)


def _on_all(at, value, odd_value, **data):
    def probe(rank, world):
        x, w, t = _data(world, **data)
        x = _set(at, odd_value if rank == world - 1 else value)(x)
        _head(x, w, t, rank)
    return probe


def _differ_later_slice(rank, world):
    from crossent.torch.distributed import _common

    x, w, t = _data(world)
    if rank == world - 1:
        x = _bits(x, (N - 1, D - 1), x.view(torch.int64)[N - 1, D - 1] ^ 1)
    saved = _common._HASH_WORDS
    _common._HASH_WORDS = 2 * 4 * D  # slices of two float64 rows
    try:
        _head(x, w, t, rank)
    finally:
        _common._HASH_WORDS = saved


def _differ_big_last_element(rank, world):
    x, w, t = _big(world)
    torch.set_num_threads(1 + rank % 2)
    if rank == world - 1:
        x = _bits(x, (1, BIG_D - 1), x.view(torch.int64)[1, BIG_D - 1] ^ 1)
    _head(x, w, t, rank)


def _differ_3d_bt_swapped(rank, world):
    x, w, t = _data(world, n=9)
    base = x.reshape(3, 3, D)
    held = base.transpose(0, 1) if rank == world - 1 else base
    _head(held, w, t.reshape(3, 3), rank)


def _differ_autocast(rank, world):
    x, w, t = _data(world, torch.float32)
    if rank == world - 1:
        x = _bits(x, (2, 2), x.view(torch.int32)[2, 2] ^ (1 << 16))  # bfloat16's lowest bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _head(x, w, t, rank)


DETECT = {
    "float32 lowest mantissa bit": _low_bit(torch.float32),
    "bfloat16 lowest mantissa bit": _low_bit(torch.bfloat16),
    "float16 lowest mantissa bit": _low_bit(torch.float16),
    "float64 lowest bit, on rank 0": _differ(
        lambda x: _bits(x, (0, 0), x.view(torch.int64)[0, 0] ^ 1), odd=0),
    "sign of one element": _differ(lambda x: _set((3, 2), -x[3, 2])(x)),
    "smallest subnormal vs 0.0 (float32)": _on_all((2, 3), 0.0, 1e-45, dtype=torch.float32),
    "NaN vs inf": _on_all((1, 1), math.nan, math.inf),
    "inf vs -inf": _on_all((1, 1), math.inf, -math.inf),
    "columns 0 and 3 swapped": _differ(lambda x: x[:, [3, 1, 2, 0]]),
    "rows rolled by one": _differ(lambda x: x.roll(1, 0)),
    "transposed square input": _differ(lambda x: x.t(), n=5, d=5),
    "(B,T,D) with B and T swapped (B == T)": _differ_3d_bt_swapped,
    "last row differs, rows hashed two at a time": _differ_later_slice,
    "last of 70000 features, other thread counts": _differ_big_last_element,
    "bfloat16's lowest bit under autocast": _differ_autocast,
    "one element of a 1x1 input": _differ(lambda x: x + 1.0, n=1, d=1),
    "zero row vs 5e-324 in it (float64)": _differ_zero_row,
}


# ---------------------------------------------- differences the hash cannot see (xfails)


def _keys(n):  # the adversary's view of _common.input_hashes's per-word keys
    return [(j * 1103515245 + 12345) % 65521 + 1 for j in range(n)]


# float32 1.0 is the words (0, 0x3F80); lowering the high word by k_0 and raising the low
# word by k_1 leaves the key-weighted sum of the row's 16-bit words unchanged
_K = _keys(4)
_COLLIDE_F32 = struct.unpack("<f", struct.pack("<2h", 0 + _K[1], 0x3F80 - _K[0]))[0]
# float64 words whose key-weighted sum is 2^31 - 1 (found by a search over the third word):
# target_hashes takes a row sum's low 31 bits mod 2^31 - 1, so 2^31 - 1 hashes as 0 does
_WORDS_P = (27214, 32767, 10160, 16368)
_COLLIDE_F64 = struct.unpack("<d", struct.pack("<4h", *_WORDS_P))[0]


def _collide_f32_one_element(rank, world):
    x, w, t = _data(world, torch.float32)
    x[0, 0] = _COLLIDE_F32 if rank == world - 1 else 1.0
    _head(x, w, t, rank)


def _collide_period(rank, world):
    x, w, t = _data(world, torch.float32, n=1, d=65522, seed=5)
    if rank == world - 1:
        x = x[:, [65521, *range(1, 65521), 0]]  # columns 0 and 65521 swapped
    _head(x, w, t, rank)


def _collide_zero_row(rank, world):
    x, w, t = _data(world)
    x[0] = 0.0
    if rank == world - 1:
        x[0, 0] = _COLLIDE_F64
    _head(x, w, t, rank)


COLLIDE = {
    "float32 x[0,0]: 1.0 vs 9.78e-30": _collide_f32_one_element,
    "float32 columns 0 and 65521 swapped (D=65522)": _collide_period,
    "zero row vs a row summing to 2^31 - 1": _collide_zero_row,
}
_REASONS = {
    "float32 x[0,0]: 1.0 vs 9.78e-30": (
        "BUG: input_hashes is linear within a row (sum_j u_j k_j, _common.py:214-221): one "
        "float32 element 1.0 on rank 0 and 9.78e-30 (bits 0x0F46597D: high word -k_0, low "
        "word +k_1) on rank 1 give equal hashes; no error, two batches mixed"),
    "float32 columns 0 and 65521 swapped (D=65522)": (
        "BUG: input_hashes's keys k_j = (j c + 12345) % 65521 + 1 repeat every 65521 words "
        "(_common.py:214): swapping features e and e+65521 of a row (any dtype, D >= 65522) "
        "goes unseen"),
    "zero row vs a row summing to 2^31 - 1": (
        "BUG: target_hashes takes lo = y & (2^31 - 1) and reduces mod 2^31 - 1 "
        "(_common.py:183), so row sums 0 and 2^31 - 1 hash alike: a zero row and the row "
        "[1.0096898078833365, 0, 0, 0] (float64) pass as equal"),
}


# ------------------------------------------------------------------------ the driver


def _outcome(probe, rank, world):
    try:
        probe(rank, world)
        return "ok"
    except InputError as e:
        return f"InputError: {e}"
    except Exception as e:  # reported in the parent
        return f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(1)


def _run_probes(rank, world, path):
    results = {}
    for name, probe in {**PASS, **DETECT, **COLLIDE}.items():
        outcomes = [None] * world
        dist.all_gather_object(outcomes, _outcome(probe, rank, world))
        results[name] = outcomes
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = {}
    for world in (2, 3):
        path = tmp_path_factory.mktemp("probes") / f"world{world}.json"
        run_group(_run_probes, world, str(path), timeout=90)
        out[world] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(PASS))
def test_equal_values_pass_and_give_torchs_numbers(outcomes, world, name):
    assert outcomes[world][name] == ["ok"] * world, outcomes[world][name]


def _assert_all_raise(got, world):
    assert len(got) == world and len(set(got)) == 1, got
    assert got[0].startswith("InputError: input differs across the ranks"), got


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(DETECT))
def test_one_rank_differs_raises_on_every_rank(outcomes, world, name):
    _assert_all_raise(outcomes[world][name], world)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(COLLIDE))
def test_differences_the_first_hash_could_not_see(outcomes, world, name):
    """Collisions of the hash of 102ea4e (fixed at stop 29: two key sequences of different
    periods, base-2^30 digits in target_hashes); see _REASONS for each construction."""
    _assert_all_raise(outcomes[world][name], world)


def test_collision_constructions():
    """The adversarial inputs are what they claim (independent of crossent)."""
    assert sum(u * k for u, k in zip(_WORDS_P, _K, strict=True)) == 2**31 - 1
    assert math.isfinite(_COLLIDE_F64) and 1.0 < _COLLIDE_F64 < 1.01
    words = struct.unpack("<2h", struct.pack("<f", _COLLIDE_F32))
    assert words[0] * _K[0] + words[1] * _K[1] == 0x3F80 * _K[1]  # 1.0's sum
    assert 9e-30 < _COLLIDE_F32 < 1e-29
    keys = _keys(65522)
    assert keys[0] == keys[65521] and len(set(keys[:65521])) == 65521


# ------------------------------ the same target_hashes collision: a hang, not an error


def _target_collision(rank, world, path):
    """Rank 0 holds class 0, rank 1 class 2^31 - 1 at row 0: the target hashes agree, the
    range check is per rank (agree()'s local ``bad`` flag), so rank 1 raises and rank 0
    goes on into the statistics all-reduce and waits (here 3 s on a subgroup)."""
    import datetime

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    logits = torch.zeros(2, 4, dtype=torch.float64)
    t = torch.tensor([2**31 - 1 if rank == 1 else 0, 1])
    try:
        vocab_parallel_cross_entropy(logits, t, group=group)
        outcome = "ok"
    except InputError as e:
        outcome = f"InputError: {e}"
    except Exception as e:
        outcome = f"{type(e).__name__}: {str(e)[:120]}"
    outcomes = [None] * world
    dist.all_gather_object(outcomes, outcome)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(outcomes, f)


def test_target_hash_collision_does_not_hang(tmp_path):
    path = tmp_path / "target.json"
    run_group(_target_collision, 2, str(path), timeout=60)
    got = json.loads(path.read_text())
    assert all(g.startswith("InputError") for g in got), got
