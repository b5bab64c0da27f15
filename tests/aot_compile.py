"""Compiles pykd's Triton kernels ahead of time for a CUDA target, without a GPU.

Run as a script (without TRITON_INTERPRET, which would turn @triton.jit into interpreted functions);
tests/test_gpu_compile.py drives it. Prints one line per compiled kernel.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pykd.kernels import common, kd_loss

PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def compile_all(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    n = 0
    for dtype in ("bfloat16", "float16", "float32"):
        p = PTR[dtype]
        sig = {
            "s_ptr": p, "t_ptr": p, "target_ptr": "*i64", "scale_ptr": "*fp32", "g_ptr": p,
            "soft_ptr": "*fp32", "hard_ptr": "*fp32", "R": "i32", "V": "i32", "stride_s": "i32",
            "stride_t": "i32", "stride_g": "i32", "inv_t": "fp32", "alpha_w": "fp32",
            "one_minus_alpha": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1mb": "fp32",
            "ignore_index": "i32",
        }  # fmt: skip
        for V in (50, 32000, 128256):
            block_v, num_warps = kd_loss.launch_config(V)
            for div in range(len(common.DIVERGENCES)):
                for has_target, same_t, grad in ((True, False, True), (False, True, False)):
                    cst = dict(
                        DIV=div, HAS_TARGET=has_target, SAME_T=same_t, COMPUTE_GRAD=grad, BLOCK_V=block_v
                    )
                    src = ASTSource(
                        fn=kd_loss._kd_loss_kernel,
                        signature=dict(sig, **{k: "constexpr" for k in cst}),
                        constexprs=cst,
                    )
                    out = triton.compile(src, target=target, options={"num_warps": num_warps})
                    assert out.asm.get("cubin"), "no cubin"
                    print(f"kd_loss {dtype} V={V} {common.DIVERGENCES[div]} target={has_target}", flush=True)
                    n += 1
        for per_row in (True, False):
            cst = {"PER_ROW": per_row, "BLOCK": 4096}
            sig = {"x_ptr": p, "scale_ptr": "*fp32", "C": "i32", "n_elem": "i64"}
            src = ASTSource(
                fn=common._scale_rows_kernel,
                signature=dict(sig, **{k: "constexpr" for k in cst}),
                constexprs=cst,
            )
            assert triton.compile(src, target=target).asm.get("cubin")
            print(f"scale_rows {dtype} per_row={per_row}", flush=True)
            n += 1
    return n


if __name__ == "__main__":
    print("compiled", compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
