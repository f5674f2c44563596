"""Compile crossent's Triton kernels for an NVIDIA GPU without one (``python
compile_for_gpu.py``; run by test_triton_kernels.py in a fresh process, since the test
process holds triton's interpreter). Triton's front end, its MLIR passes and ptxas all run
on the CPU, so a kernel that only the interpreter accepts fails here; prints one line per
variant and exits 1 on the first failure."""

from __future__ import annotations

import os
import sys

FLAGS = ["PROB", "HAS_WEIGHT", "HAS_ROWMULT", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD", "REVERSE",
         "PERSISTENT"]


def ce_signature(dtype: str, acc: str) -> dict[str, str]:
    return {"Z": f"*{dtype}", "stride_z": "i64", "G": f"*{dtype}", "stride_g": "i64",
            "Y": "*i64", "T": f"*{dtype}", "stride_t": "i64", "W": f"*{acc}",
            "PARAMS": f"*{acc}", "SCALE": f"*{acc}", "ROWMULT": f"*{acc}", "LOSS": f"*{acc}",
            "LSE": f"*{acc}", "V": "i32", "n_rows": "i32", "ignore_index": "i32"}


def main() -> int:
    # here, not at import: pytest --doctest-modules imports this file into its process
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crossent.torch._triton import kernels

    jitted = kernels.compiled()
    target = GPUTarget("cuda", 90, 32)
    # (input dtype, flags on, BLOCK, warps): today's default launch with every index-target
    # option, then the launch variants (REVERSE, PERSISTENT, Liger's 32768-class tile with
    # 32 warps) spread over the other three
    prob_all = {"PROB", "HAS_WEIGHT", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD"}
    variants = [
        ("bf16", {"HAS_WEIGHT", "HAS_ROWMULT", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD"}, 8192, 16),
        ("fp32", prob_all | {"REVERSE", "PERSISTENT"}, 32768, 32),
        ("fp64", {"GRAD", "PERSISTENT"}, 4096, 8),
        ("fp16", {"REVERSE"}, 1024, 4),
    ]
    for dtype, on, block, warps in variants:
        acc = "fp64" if dtype == "fp64" else "fp32"
        consts = {f: f in on for f in FLAGS}
        consts.update(ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=block)
        sig = ce_signature(dtype, acc)
        sig.update({k: "constexpr" for k in consts})
        try:
            triton.compile(ASTSource(fn=jitted["ce"], signature=sig, constexprs=consts),
                           target=target, options={"num_warps": warps})
        except Exception as exc:
            print(f"FAIL ce {dtype} {sorted(on)}: {exc}")
            return 1
        print(f"ok ce {dtype} {sorted(on)}")
    for dtype, fp32 in (("bf16", False),):  # fp32 differs only in the dot's precision
        blocks = {"BLOCK_M": 64 if fp32 else 128, "BLOCK_N": 128, "BLOCK_K": 32 if fp32 else 64}
        common = {"X": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "Y": "*i64"}
        consts = {"HAS_BIAS": True, "FP32": fp32, "UPCAST": False, **blocks}
        lse_sig = {**common, "M_OUT": "*fp32", "S_OUT": "*fp32", "ZY_OUT": "*fp32", "M": "i32",
                   "V": "i32", "D": "i32", "stride_x": "i64", "stride_w": "i64",
                   "tiles_per_split": "i32", **{k: "constexpr" for k in consts}}
        grad_consts = {**consts, "NEED_X": True, "NEED_W": True, "NEED_B": True}
        grad_sig = {**common, "LSE": "*fp32", "COEF_P": "*fp32", "COEF_Y": "*fp32",
                    "DX": "*fp32", "DW": "*fp32", "DB": "*fp32", "M": "i32", "V": "i32",
                    "D": "i32", "stride_x": "i64", "stride_w": "i64",
                    **{k: "constexpr" for k in grad_consts}}
        for name, sig, cs in (("linear_lse", lse_sig, consts),
                              ("linear_grad", grad_sig, grad_consts)):
            try:
                triton.compile(ASTSource(fn=jitted[name], signature=sig, constexprs=cs),
                               target=target, options={"num_warps": 8})
            except Exception as exc:
                print(f"FAIL {name} {dtype}: {exc}")
                return 1
            print(f"ok {name} {dtype}")
    for per_row in (False, True):
        consts = {"PER_ROW": per_row, "ACC": tl.float32, "BLOCK": 4096}
        sig = {"X": "*bf16", "stride_x": "i64", "GO": "*fp32", "ncols": "i32", "tiles": "i32"}
        sig.update({k: "constexpr" for k in consts})
        try:
            triton.compile(ASTSource(fn=jitted["scale"], signature=sig, constexprs=consts),
                           target=target, options={"num_warps": 4})
        except Exception as exc:
            print(f"FAIL scale per_row={per_row}: {exc}")
            return 1
        print(f"ok scale per_row={per_row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
