//! The CUDA backend's own kernels (feature `cuda`), compiled from source with NVRTC when the
//! backend first needs them, so that the binary carries no PTX for a fixed GPU generation.
//!
//! - `fp8_gemv`: `y[m, n] = x[m, k] · wᵀ` for a few rows (decode), reading a block-quantised
//!   FP8 E4M3FN weight at one byte a value and multiplying in f32: one warp per weight row;
//! - `fp8_gemv_grouped`: many such products in one launch, each its own weight, inputs and
//!   outputs, from a table on the GPU (a MoE layer's experts, attention's heads);
//! - `fp8_to_bf16`: the same weight dequantised to bf16, for cuBLAS' products of many rows
//!   (prefill);
//! - `silu_mul`: SiLU-and-multiply of an MLP's gate and up products, into the f32 or bf16
//!   activations of its down product;
//! - `causal_softmax`: the scaled, causally masked softmax of attention scores, a block per row;
//! - `paged_rows`: rows of a paged KV cache into a dense buffer, or a dense buffer into them;
//! - `heads_copy`: per-head column slices between attention's layouts, in f32 or bf16;
//! - `rms_norm`: RMSNorm of the leading columns of each row, into f32 or bf16;
//! - `rope_rotate`: the rotary embedding of queries' and keys' rotary columns, by a table of
//!   angles per row (YaRN's schedule and factor computed on the host);
//! - `gate_route`: a MoE gate's routing of each row of its logits (sigmoid or softmax,
//!   group-limited top-k, weights), so that only the routes travel to the host;
//! - `logits_best`: each row of the LM head's logits reduced to its best few and their
//!   log-sum-exp, for greedy and top-k samplers;
//! - `quantize_fp8_rows`: activations to FP8 E4M3FN in DeepSeek-V3's 1 × 128 blocks, for the
//!   FP8 products on tensor cores;
//! - `add_into`: one buffer added into another (an attention block's output into the residual).
//!
//! The FP8 kernels dequantise exactly as the checkpoint reader does (`fp8(code) * scale` in f32), so the
//! decode product differs from the CPU's only in the order of its additions.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{compile_ptx, Ptx};

use crate::error::{Error, Result};

const SOURCE: &str = include_str!("nvrtc.cu");

/// The kernels, loaded into one GPU's context.
pub struct Kernels {
    pub fp8_gemv: CudaFunction,
    pub fp8_gemv_grouped: CudaFunction,
    pub fp8_to_bf16: CudaFunction,
    pub silu_mul: CudaFunction,
    pub causal_softmax: CudaFunction,
    pub paged_rows: CudaFunction,
    pub heads_copy: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope_rotate: CudaFunction,
    pub gate_route: CudaFunction,
    pub logits_best: CudaFunction,
    pub quantize_fp8_rows: CudaFunction,
    pub add_into: CudaFunction,
}

impl Kernels {
    /// Compiles the kernels and loads them into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let module = ctx
            .load_module(ptx()?)
            .map_err(|e| Error::Device(format!("loading the kernels' PTX: {e}")))?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| Error::Device(format!("kernel {name}: {e}")))
        };
        Ok(Self {
            fp8_gemv: function("fp8_gemv")?,
            fp8_gemv_grouped: function("fp8_gemv_grouped")?,
            fp8_to_bf16: function("fp8_to_bf16")?,
            silu_mul: function("silu_mul")?,
            causal_softmax: function("causal_softmax")?,
            paged_rows: function("paged_rows")?,
            heads_copy: function("heads_copy")?,
            rms_norm: function("rms_norm")?,
            rope_rotate: function("rope_rotate")?,
            gate_route: function("gate_route")?,
            logits_best: function("logits_best")?,
            quantize_fp8_rows: function("quantize_fp8_rows")?,
            add_into: function("add_into")?,
        })
    }
}

/// The kernels' PTX, from NVRTC (libnvrtc, CUDA 12).
pub fn ptx() -> Result<Ptx> {
    // SAFETY: only tries to load the library by name, which runs its initialisers as any use
    // of it would.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device(
            "NVRTC (libnvrtc.so, CUDA 12) is not on the library path".into(),
        ));
    }
    compile_ptx(SOURCE).map_err(|e| Error::Device(format!("compiling the kernels: {e}")))
}
