"""Compile crossent's Triton kernels for an NVIDIA GPU without one (``python
compile_for_gpu.py [GROUP ...]``; run once per test session, in a fresh process, by the
``sm90_compile`` fixture of conftest.py, since the test process holds triton's
interpreter). Triton's front end, its MLIR passes and ptxas all run on the CPU, so a kernel
that only the interpreter accepts fails here.

Groups (all by default), each line ``ok GROUP ...`` or ``FAIL GROUP ...``; exit status 1
if any case failed:

- ``kernels``: every kernel (ce with every index-target option and the launch variants,
  linear_lse, linear_grad, scale); asserted by test_triton_kernels.py.
- ``constexpr``: every (REVERSE, PERSISTENT) pair of ce with index targets + GRAD + every
  option (bf16), with probability targets and GRAD off, with index targets, smoothing and
  GRAD off, and triton's constant specialisations of V = 1, one row, ignore_index = 1;
  asserted by test_triton_variants_review.py.
- ``rowloop``: the persistent kernel's TTIR (bf16, GRAD, REVERSE, row multipliers,
  BLOCK 32768, 32 warps), printed between ``BEGIN rowloop`` and ``END rowloop``;
  asserted by test_triton_kernel_variants.py (its row loop runs in int64).
"""

from __future__ import annotations

import os
import sys
from typing import Any

FLAGS = ["PROB", "HAS_WEIGHT", "HAS_ROWMULT", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD", "REVERSE",
         "PERSISTENT"]
GROUPS = ("kernels", "constexpr", "rowloop")


def ce_signature(dtype: str, acc: str) -> dict[str, str]:
    return {"Z": f"*{dtype}", "stride_z": "i64", "G": f"*{dtype}", "stride_g": "i64",
            "Y": "*i64", "T": f"*{dtype}", "stride_t": "i64", "W": f"*{acc}",
            "PARAMS": f"*{acc}", "SCALE": f"*{acc}", "ROWMULT": f"*{acc}", "LOSS": f"*{acc}",
            "LSE": f"*{acc}", "V": "i32", "n_rows": "i32", "ignore_index": "i32"}


def ce_case(dtype: str, on: set[str], block: int, warps: int,
            ints: dict[str, int] | None = None) -> tuple[str, str, dict[str, Any], int]:
    """``("ce", signature, constexprs, warps)`` of ``ce_kernel``: ``dtype`` input, the
    flags ``on`` set, tile ``block``; ``ints`` are integer arguments given as constants
    (triton's launcher specialises ints equal to 1 that way)."""
    import triton.language as tl

    acc = "fp64" if dtype == "fp64" else "fp32"
    consts: dict[str, Any] = {f: f in on for f in FLAGS}
    consts.update(ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=block, **(ints or {}))
    sig = ce_signature(dtype, acc)
    sig.update({k: "constexpr" for k in consts})
    return "ce", sig, consts, warps


def kernel_cases() -> list[tuple[str, tuple[str, str, dict[str, Any], int]]]:
    import triton.language as tl

    # (input dtype, flags on, BLOCK, warps): today's default launch with every index-target
    # option, then the launch variants (REVERSE, PERSISTENT, Liger's 32768-class tile with
    # 32 warps) spread over the other three
    prob_all = {"PROB", "HAS_WEIGHT", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD"}
    cases = [
        ce_case("bf16", {"HAS_WEIGHT", "HAS_ROWMULT", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD"},
                8192, 16),
        ce_case("fp32", prob_all | {"REVERSE", "PERSISTENT"}, 32768, 32),
        ce_case("fp64", {"GRAD", "PERSISTENT"}, 4096, 8),
        ce_case("fp16", {"REVERSE"}, 1024, 4),
    ]
    named = [(f"ce {sig['Z'][1:]} {sorted(f for f in FLAGS if consts[f])}",
              (name, sig, consts, warps)) for name, sig, consts, warps in cases]
    for dtype, fp32 in (("bf16", False),):  # fp32 differs only in the dot's precision
        blocks = {"BLOCK_M": 64 if fp32 else 128, "BLOCK_N": 128, "BLOCK_K": 32 if fp32 else 64}
        common = {"X": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "Y": "*i64"}
        lin: dict[str, Any] = {"HAS_BIAS": True, "FP32": fp32, "UPCAST": False, **blocks}
        lse_sig = {**common, "M_OUT": "*fp32", "S_OUT": "*fp32", "ZY_OUT": "*fp32", "M": "i32",
                   "V": "i32", "D": "i32", "stride_x": "i64", "stride_w": "i64",
                   "tiles_per_split": "i32", **{k: "constexpr" for k in lin}}
        grad_consts = {**lin, "NEED_X": True, "NEED_W": True, "NEED_B": True}
        grad_sig = {**common, "LSE": "*fp32", "COEF_P": "*fp32", "COEF_Y": "*fp32",
                    "DX": "*fp32", "DW": "*fp32", "DB": "*fp32", "M": "i32", "V": "i32",
                    "D": "i32", "stride_x": "i64", "stride_w": "i64",
                    **{k: "constexpr" for k in grad_consts}}
        named.append((f"linear_lse {dtype}", ("linear_lse", lse_sig, lin, 8)))
        named.append((f"linear_grad {dtype}", ("linear_grad", grad_sig, grad_consts, 8)))
    for per_row in (False, True):
        scale: dict[str, Any] = {"PER_ROW": per_row, "ACC": tl.float32, "BLOCK": 4096}
        sig = {"X": "*bf16", "stride_x": "i64", "GO": "*fp32", "ncols": "i32", "tiles": "i32"}
        sig.update({k: "constexpr" for k in scale})
        named.append((f"scale per_row={per_row}", ("scale", sig, scale, 4)))
    return named


def constexpr_cases() -> list[tuple[str, tuple[str, str, dict[str, Any], int]]]:
    all_idx = {"HAS_WEIGHT", "HAS_ROWMULT", "HAS_CAP", "SMOOTH", "ZLOSS"}
    all_prob = {"PROB", "HAS_WEIGHT", "HAS_CAP", "SMOOTH", "ZLOSS"}
    cases = []
    for rev in (False, True):
        for pers in (False, True):
            launch = {"REVERSE"} if rev else set()
            launch |= {"PERSISTENT"} if pers else set()
            cases.append(("bf16", all_idx | {"GRAD"} | launch, 8192, 16, {}))
            cases.append(("fp32", all_prob | launch, 4096, 8, {}))          # GRAD off, PROB
            cases.append(("fp32", {"SMOOTH"} | launch, 1024, 4, {}))        # GRAD off, index
    # ints equal to 1 are specialised as constants by triton's launcher: V = 1 (so stride
    # 1), one row, ignore_index = 1
    cases.append(("fp32", {"GRAD", "REVERSE", "PERSISTENT", "SMOOTH"}, 16, 1,
                  {"V": 1, "stride_z": 1, "stride_g": 1, "n_rows": 1, "ignore_index": 1}))
    cases.append(("fp16", {"GRAD", "PROB", "PERSISTENT", "REVERSE"}, 16, 1,
                  {"V": 1, "stride_z": 1, "stride_g": 1, "stride_t": 1, "n_rows": 1}))
    cases.append(("fp64", {"GRAD", "HAS_ROWMULT", "REVERSE"}, 16, 1, {"n_rows": 1}))
    return [(f"{dtype} {sorted(on)} {ints}", ce_case(dtype, on, block, warps, ints))
            for dtype, on, block, warps, ints in cases]


def rowloop_case() -> tuple[str, str, dict[str, Any], int]:
    return ce_case("bf16", {"GRAD", "PERSISTENT", "REVERSE", "HAS_ROWMULT"}, 32768, 32)


def _kernels_module() -> Any:
    """crossent's ``crossent/torch/_triton/kernels.py`` (it imports nothing but triton),
    loaded from its file: importing it as ``crossent.torch._triton.kernels`` would run
    ``crossent.torch``'s ``__init__``, which imports torch (about 2 s of CPU; this process
    needs only triton)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("crossent")
    assert spec is not None and spec.origin is not None, "crossent is not installed"
    path = pathlib.Path(spec.origin).parent / "torch" / "_triton" / "kernels.py"
    name = "crossent_triton_kernels"
    kernels_spec = importlib.util.spec_from_file_location(name, path)
    assert kernels_spec is not None and kernels_spec.loader is not None, path
    module = importlib.util.module_from_spec(kernels_spec)
    sys.modules[name] = module
    kernels_spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    # here, not at import: pytest --doctest-modules imports this file into its process
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = _kernels_module().compiled()
    target = GPUTarget("cuda", 90, 32)

    def compile_one(case: tuple[str, str, dict[str, Any], int]) -> Any:
        name, sig, consts, warps = case
        return triton.compile(ASTSource(fn=jitted[name], signature=sig, constexprs=consts),
                              target=target, options={"num_warps": warps})

    groups = argv or list(GROUPS)
    failed = 0
    for group in groups:
        if group == "rowloop":
            try:
                ttir = compile_one(rowloop_case()).asm["ttir"]
            except Exception as exc:
                failed += 1
                print(f"FAIL rowloop: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            print("ok rowloop")
            print("BEGIN rowloop", ttir, "END rowloop", sep="\n")
            continue
        cases = kernel_cases() if group == "kernels" else constexpr_cases()
        for label, case in cases:
            try:
                compile_one(case)
            except Exception as exc:
                failed += 1
                print(f"FAIL {group} {label}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            print(f"ok {group} {label}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
