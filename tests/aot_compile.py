"""Compiles pykd's Triton kernels ahead of time for a CUDA target, without a GPU.

Run as a script (without TRITON_INTERPRET, which would turn @triton.jit into interpreted functions);
tests/test_gpu_compile.py drives it. Prints one line per compiled kernel.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pykd.kernels import attention_kd, common, kd_loss, sparse_quant, topk_kd_loss

PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
STATS: list[dict] = []  # one row per compiled kernel, when --csv is given
FIELDS = ["kernel", "arch", "num_warps", "registers", "stack_bytes", "local_loads", "local_stores",
          "shared_bytes", "wgmma", "mma_sync", "async_loads", "triton"]  # fmt: skip


def source(fn, signature: dict, constexprs: dict, ints: dict) -> ASTSource:
    """fn as a launch with these int arguments (name: value at a typical size) specializes it
    (triton/runtime/jit.py): each pointer 16-byte aligned (torch's allocations are), an int equal to 1
    a constexpr, one divisible by 16 marked so. Only with these hints does the compiler vectorize and
    pipeline the loads: without them it compiles another kernel (scalar loads, none pipelined, other
    registers and spills) than the one that runs."""
    cst, sig = dict(constexprs), dict(signature, **dict.fromkeys(constexprs, "constexpr"))
    for name, value in ints.items():
        assert name in fn.arg_names and sig[name].startswith("i"), name
        if value == 1:
            cst[name], sig[name] = 1, "constexpr"
    attrs = {}
    for i, a in enumerate(fn.arg_names):
        if sig[a].startswith("*") or (sig[a].startswith("i") and ints.get(a, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs)


def build(src, target, label: str, **options) -> None:
    """Compiles one kernel to a cubin and prints its label; with --csv, records what the compiler
    made of it: registers, stack frame and local-memory traffic (spills), shared memory, whether
    its dots became Hopper's wgmma (HGMMA / QGMMA in SASS) or mma.sync (HMMA / IMMA), and its
    asynchronous global-to-shared copies (LDGSTS, TMA's UTMALDG: loads the software pipeline
    prefetches)."""
    out = triton.compile(src, target=target, options=options)
    assert out.asm.get("cubin"), f"no cubin for {label}"
    print(label, flush=True)
    if ARGS.csv:
        STATS.append(dict(kernel=label, arch=target.arch, num_warps=options.get("num_warps", 4),
                          shared_bytes=out.metadata.shared, triton=triton.__version__,
                          **sass_stats(out.asm["cubin"])))  # fmt: skip


def sass_stats(cubin: bytes) -> dict:
    """Resource usage and instruction counts from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res))

    def count(*ops):
        return sum(len(re.findall(r"\b" + op + r"\b", sass)) for op in ops)

    return dict(registers=int(usage["REG"]), stack_bytes=int(usage["STACK"]) + int(usage["LOCAL"]),
                local_loads=count("LDL"), local_stores=count("STL"), wgmma=count("HGMMA", "QGMMA", "IGMMA"),
                mma_sync=count("HMMA", "IMMA"), async_loads=count("LDGSTS", "UTMALDG"))  # fmt: skip


def compile_all(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    n = 0
    for dtype in ("bfloat16", "float16", "float32"):
        p = PTR[dtype]
        sig = {
            "s_ptr": p, "t_ptr": p, "target_ptr": "*i64", "scale_ptr": "*fp32", "g_ptr": p,
            "soft_ptr": "*fp32", "hard_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*fp32", "R": "i32",
            "V": "i32", "V_total": "i32", "vocab_start": "i32", "stride_s": "i32",
            "stride_t": "i32", "stride_g": "i32", "inv_t": "fp32", "alpha_w": "fp32",
            "one_minus_alpha": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1mb": "fp32",
            "ignore_index": "i32", "s_scale": "fp32", "s_cap": "fp32", "t_scale": "fp32", "t_cap": "fp32",
        }  # fmt: skip
        for V in (50, 32000, 128256):
            block_v, num_warps = kd_loss.launch_config(V)
            for div in range(len(common.DIVERGENCES)):
                for has_target, same_t, grad in ((True, False, True), (False, True, False)):
                    # the soft-cap (tanh) path compiled with the target variant
                    cst = dict(DIV=div, HAS_TARGET=has_target, SAME_T=same_t, COMPUTE_GRAD=grad,
                               S_CAP=has_target, T_CAP=has_target, PHASE=0, BLOCK_V=block_v,
                               REVERSE=kd_loss.REVERSE)  # fmt: skip
                    src = source(kd_loss._kd_loss_kernel, sig, cst, _row_ints(kd_loss._kd_loss_kernel, V))
                    build(src, target, f"kd_loss {dtype} V={V} {common.DIVERGENCES[div]} target={has_target}",
                          num_warps=num_warps)  # fmt: skip
                    n += 1
        if dtype == "bfloat16":  # the vocabulary-slice phases (process_group=), at a quarter of 128256
            block_v, num_warps = kd_loss.launch_config(32064)
            for div, phase in (("kl", 1), ("kl", 3), ("jsd", 2), ("jsd", 3), ("mse", 1), ("mse", 3)):
                cst = dict(DIV=common.DIVERGENCES.index(div), HAS_TARGET=True, SAME_T=False,
                           COMPUTE_GRAD=phase == 3, S_CAP=False, T_CAP=False, PHASE=phase,
                           BLOCK_V=block_v, REVERSE=kd_loss.REVERSE)  # fmt: skip
                src = source(
                    kd_loss._kd_loss_kernel,
                    sig,
                    cst,
                    _row_ints(kd_loss._kd_loss_kernel, 32064, V_total=128256, vocab_start=32064),
                )
                build(src, target, f"kd_loss {dtype} V=32064 {div} phase={phase}", num_warps=num_warps)
                n += 1
            # the reversed sweeps (REVERSE, benchmarks/tune_kd_loss.py), two sweeps and three
            block_v, num_warps = kd_loss.launch_config(128256)
            for div in ("kl", "jsd"):
                cst = dict(DIV=common.DIVERGENCES.index(div), HAS_TARGET=True, SAME_T=False,
                           COMPUTE_GRAD=True, S_CAP=False, T_CAP=False, PHASE=0, BLOCK_V=block_v,
                           REVERSE=not kd_loss.REVERSE)  # fmt: skip
                src = source(kd_loss._kd_loss_kernel, sig, cst, _row_ints(kd_loss._kd_loss_kernel, 128256))
                build(src, target, f"kd_loss {dtype} V=128256 {div} reverse={not kd_loss.REVERSE}",
                      num_warps=num_warps)  # fmt: skip
                n += 1
        for per_row in (True, False):
            cst = {"PER_ROW": per_row, "BLOCK": 4096}
            sig = {"x_ptr": p, "scale_ptr": "*fp32", "C": "i32", "n_elem": "i64"}
            src = source(common._scale_rows_kernel, sig, cst, dict(C=4096, n_elem=16384 * 4096))
            build(src, target, f"scale_rows {dtype} per_row={per_row}")
            n += 1
    n += compile_topk(target)
    # fp8 e4m3 needs sm_89+: on sm_80 the quantized variants compile with int8 only
    dims = (64, 128) if arch >= 90 else (64,)
    n += compile_attention(target, head_dims=dims, fp8=arch >= 89, tma=arch >= 90)
    n += compile_quantize(target, fp8=arch >= 89)
    return n


def compile_quantize(target, fp8=True) -> int:
    """The Q/K quantization pre-pass, bf16 input at D = 128 and 64-token blocks, with smoothing."""
    n = 0
    for is_fp8 in (False, True) if fp8 else (False,):
        cst = dict(D=128, BLOCK_D=128, BS=64, HAS_MEAN=True, FP8=is_fp8)
        sig = {"x_ptr": "*bf16", "mean_ptr": "*fp32", "codes_ptr": "*fp8e4nv" if is_fp8 else "*i8",
               "scale_ptr": "*fp32", "deq_ptr": "*fp32", "stride_xb": "i32", "stride_xh": "i32",
               "stride_xn": "i32", "stride_xd": "i32", "H": "i32", "N": "i32", "NB": "i32",
               "levels": "fp32"}  # fmt: skip
        ints = dict(stride_xb=16 * 8192 * 128, stride_xh=8192 * 128, stride_xn=128, stride_xd=1, H=16, N=8192,
                    NB=128)  # fmt: skip
        src = source(sparse_quant._quantize_tokens_kernel, sig, cst, ints)
        build(src, target, f"quantize_tokens bfloat16 D=128 {'fp8_e4m3' if is_fp8 else 'int8'}", num_warps=8)
        n += 1
    return n


def compile_topk(target) -> int:
    """topk_kd_loss's row kernel for each dtype and tail mode, at V = 128256 and K = 64."""
    K = topk_kd_loss
    n = 0
    for dtype in ("bfloat16", "float16", "float32"):
        p = PTR[dtype]
        sig = {
            "s_ptr": p, "lp_ptr": "*fp32", "idx_ptr": "*i64", "target_ptr": "*i64", "scale_ptr": "*fp32",
            "g_ptr": p, "soft_ptr": "*fp32", "hard_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*fp32",
            "R": "i32", "V": "i32", "V_total": "i32", "vocab_start": "i32", "K": "i32",
            "stride_s": "i32", "stride_k": "i32", "stride_g": "i32", "inv_t": "fp32", "alpha_w": "fp32",
            "one_minus_alpha": "fp32", "ignore_index": "i32", "s_scale": "fp32", "s_cap": "fp32",
        }  # fmt: skip
        variants = [(tail, t, 0) for tail in (True, False) for t in (True, False)]
        if dtype == "bfloat16":  # the vocabulary-slice phases (process_group=)
            variants += [(tail, True, phase) for tail in (True, False) for phase in (1, 2)]
        for tail, has_target, phase in variants:
            grad = phase == 2 or (phase == 0 and has_target)
            cst = dict(TAIL=tail, HAS_TARGET=has_target, SAME_T=not has_target, COMPUTE_GRAD=grad,
                       BLOCK_V=K.MAX_BLOCK_V, BLOCK_K=64, KW=K.KW, S_CAP=has_target and phase == 0,
                       PHASE=phase, REVERSE=K.REVERSE)  # fmt: skip
            src = source(K._topk_kd_loss_kernel, sig, cst, _row_ints(K._topk_kd_loss_kernel, 128256, K=64))
            label = f"topk_kd_loss {dtype} tail={tail} target={has_target}" + (
                f" phase={phase}" if phase else ""
            )
            build(src, target, label, num_warps=8)
            n += 1
    return n


def _row_ints(fn, V: int, **over) -> dict:
    """The int arguments of a row kernel's launch on 16384 contiguous rows of V logits."""
    ints = dict(R=16384, V=V, V_total=V, vocab_start=0, stride_s=V, stride_t=V, stride_g=V)
    ints.update(over)
    return {k: v for k, v in ints.items() if k in fn.arg_names}


def _attention_ints(fn, D: int, flags: dict) -> dict:
    """The int arguments of an attention launch at H 16, N 8192, head dim D, contiguous (B, H, N, D)
    tensors, no GQA; 64-token blocks (block lists, quantization scales) where the flags use them
    (the launcher passes 1 where they are absent). Every stride is then a multiple of 16 (D, N, 64
    captured keys, or 0 for an absent tensor's)."""
    N, H, nb = 8192, 16, 8192 // 64
    ints = {a: 16 * D for a in fn.arg_names if a.startswith("stride_")}
    ints.update(H=H, H_KV=H, G_S=1, G_T=1, N_Q=N, N_K=N, K_CAP=64 if flags.get("DIV") == 5 else 0)
    sparse, quant = flags["HAS_BM"], flags["QK_Q"] != 0
    ints.update(BS=64 if sparse or quant else 1, NB=nb if sparse else 1, NBK=nb if sparse else 1,
                NBQS=nb if quant else 1, NBKS=nb if quant else 1)  # fmt: skip
    return {k: v for k, v in ints.items() if k in fn.arg_names}


def compile_attention(target, head_dims, fp8=True, tma=True) -> int:
    """attention_kd's three kernels (bf16, kl, causal + padding) at the launcher's block shapes, then
    the sparse/quantized variants (DESIGN.md section 6) at D = 64: block lists + row threshold in all
    three, int8 QK with fp8 P and fp8 QK with int8 P in the forward, the dense-Delta pass of dq; and
    the dk/dv kernel that adds dq with atomics (DQ_MODE "atomic") at each head dim. With tma (sm_90),
    also the tensor-descriptor loads (LOADS "tma") of the three kernels and the atomic dk/dv one.
    fp32 variants take ~15 s each on 2 cores, so not every divergence and dtype: those ran on an
    H100 (tests marked gpu)."""
    K = attention_kd
    kernels = {
        "fwd": K._attention_kd_fwd_kernel,
        "dkdv": K._attention_kd_bwd_dkdv_kernel,
        "dq": K._attention_kd_bwd_dq_kernel,
    }
    off = dict(HAS_BM=False, HAS_THR=False, QK_Q=0, PV_Q=0, DELTA_ONLY=False, T_MAP=False, ATOMIC_DQ=False,
               TMA=False, TMA_T=False)  # fmt: skip
    cases = [(D, name, off, "") for D in head_dims for name in kernels]
    cases += [(D, "dkdv", dict(off, ATOMIC_DQ=True), " atomic dq") for D in head_dims]
    if tma:
        on = dict(off, TMA=True, TMA_T=True)
        cases += [(D, name, on, " tma") for D in head_dims for name in kernels]
        cases += [(D, "dkdv", dict(on, ATOMIC_DQ=True), " atomic dq tma") for D in head_dims]
    # every shipped configuration: each sequence-length entry of CONFIGS, the first one in the
    # variants below
    cases = [(D, name, dict(flags, CONFIG=cfg), label) for D, name, flags, label in cases
             for cfg in shipped(name, flags, D)]  # fmt: skip
    sparse = dict(off, HAS_BM=True, HAS_THR=True)
    cases += [
        (64, "fwd", dict(sparse, QK_Q=1, PV_Q=2 if fp8 else 1), " block+topk int8 QK fp8 P"),
        (64, "fwd", dict(off, QK_Q=2 if fp8 else 1, PV_Q=1), " fp8 QK int8 P"),
        (64, "dkdv", sparse, " block+topk"),
        (64, "dq", sparse, " block+topk"),
        (64, "dq", dict(sparse, DELTA_ONLY=True), " dense delta"),
        (16, "fwd", dict(off, QK_Q=1, PV_Q=1), " int8 QK at D=16 (head dim padded to 32)"),
    ]
    topk = dict(off, DIV=K.DIVERGENCES.index("topk_kl"))  # distilling from a top-k capture
    cases += [(64, name, topk, " from a top-k capture") for name in kernels]
    cases += [(64, name, dict(off, T_MAP=True), " from a uint8 map capture") for name in kernels]
    n = 0
    for D, name, flags, label in cases:
        kernel = kernels[name]
        flags = dict(flags)
        configs = shipped(name, flags, D)
        BM, BN, warps, stages = flags.pop("CONFIG", None) or configs[0]
        if len(configs) > 1:  # several sequence-length entries: name each
            label += f" {warps}w{stages}s"
        if flags["HAS_BM"]:
            BM, BN = min(BM, 64), min(BN, 64)
        block_ds = max(32, D) if flags["QK_Q"] else D  # as the launcher pads it
        cst = dict(D_S=D, D_T=D, BLOCK_DS=block_ds, BLOCK_DT=D, DIV=K.DIVERGENCES.index("kl"), HAS_MASK=True,
                   CAUSAL=True, PREC=K._prec(torch.bfloat16), BLOCK_M=BM, BLOCK_N=BN)  # fmt: skip
        if flags.get("DIV") == K.DIVERGENCES.index("topk_kl") or flags["T_MAP"]:
            cst.update(D_T=16, BLOCK_DT=16)  # as the launcher sets them
        if flags["DELTA_ONLY"]:
            cst["DIV"] = 0
        extra = {"HAS_V": True, "SAME_TAU": False, "HAS_DO": True, **flags}
        cst.update({k: v for k, v in extra.items() if k in kernel.arg_names})
        src = source(kernel, _attention_signature(kernel, cst), cst, _attention_ints(kernel, D, flags))
        build(src, target, f"attention_kd {name} bfloat16 D={D} kl{label} {BM}x{BN}",
              num_warps=warps, num_stages=stages)  # fmt: skip
        n += 1
    return n


def shipped(name, flags, D) -> list:
    """The distinct CONFIGS entries of kernel name (of dkdv_atomic with ATOMIC_DQ) at head dim D."""
    table = attention_kd.CONFIGS["dkdv_atomic" if flags.get("ATOMIC_DQ") else name][64 if D <= 64 else 128]
    return sorted(set(table.values()))


def _attention_signature(kernel, cst) -> dict:
    floats = {"qk_scale", "qk_scale_t", "inv_tau", "scale_s"}
    f32_ptrs = {"row_ptr", "lse_ptr", "stats_ptr", "delta_ptr", "grow_ptr", "thr_ptr", "qs_ptr", "ks_ptr"}
    codes = {1: "*i8", 2: "*fp8e4nv"}.get(cst.get("QK_Q", 0), "*bf16")
    ptrs = {"mask_ptr": "*u8", "th_ptr": "*i64", "cnt_ptr": "*i32", "idx_ptr": "*i32", "qc_ptr": codes,
            "kc_ptr": codes}  # fmt: skip
    if cst["DIV"] == attention_kd.DIVERGENCES.index("topk_kl"):  # the capture's probs and indices
        ptrs.update(qt_ptr="*fp32", kt_ptr="*i32")
    if cst.get("T_MAP"):  # a uint8 map of the teacher's P (k_t unused: the launcher passes it again)
        ptrs.update(qt_ptr="*u8", kt_ptr="*u8")
    if cst.get("ATOMIC_DQ"):  # the dk/dv kernel's fp32 dq accumulator
        ptrs.update(dq_ptr="*fp32")
    if cst.get("TMA"):  # tensor descriptors: q-like tensors in BLOCK_M-row blocks, k-like in BLOCK_N
        for name, rows, bd in (
            ("q_ptr", "BLOCK_M", "BLOCK_DS"),
            ("do_ptr", "BLOCK_M", "BLOCK_DS"),
            ("k_ptr", "BLOCK_N", "BLOCK_DS"),
            ("v_ptr", "BLOCK_N", "BLOCK_DS"),
            ("qt_ptr", "BLOCK_M", "BLOCK_DT"),
            ("kt_ptr", "BLOCK_N", "BLOCK_DT"),
        ):
            if name in kernel.arg_names and (cst.get("TMA_T") or not name.startswith(("qt", "kt"))):
                ptrs[name] = f"tensordesc<bf16[1, 1, {cst[rows]}, {cst[bd]}]>"
    sig = {}
    for a in kernel.arg_names:
        if a in cst:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = ptrs.get(a, "*fp32" if a in f32_ptrs else "*bf16")
        else:
            sig[a] = "fp32" if a in floats else "i32"
    return sig


ARGS = argparse.Namespace(csv=None)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("arch", type=int, nargs="?", default=90)
    p.add_argument("--csv", help="write each kernel's registers, spills, shared memory and MMA kind here")
    ARGS = p.parse_args()
    n = compile_all(ARGS.arch)
    if ARGS.csv:
        os.makedirs(os.path.dirname(os.path.abspath(ARGS.csv)), exist_ok=True)
        with open(ARGS.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(STATS)
    print("compiled", n)
