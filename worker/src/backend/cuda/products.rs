//! Products with a weight on the GPU: a group of them, or a group of gated MLPs (a MoE layer's
//! experts), in one round trip; and within a round trip, independent products in as few
//! launches as their shapes allow (FP8 ones of a few rows one `fp8_gemv_grouped`, f32 or bf16
//! ones of one shape one batched cuBLAS call).

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::blas::{gemm, gemm_batched, Shape};
use super::{
    dim, driver, launch_config, ptr_mut, Activations, CudaBackend, CudaMatrix, DeviceWeights,
    Enqueued, Staged,
};
use crate::backend::grid::{self, FP8_GEMV_ROWS};
use crate::backend::{MlpRun, Product};
use crate::error::{Error, Result};

impl CudaBackend {
    /// `products` in order on the stream, with one upload of their activations (f32, and
    /// rounded to bf16 for the products that multiply bf16), their launches, one download and
    /// one wait: a MoE layer's experts or attention's heads cost one round trip, not one each.
    /// Errors are the driver's or cuBLAS'.
    pub(super) fn try_linear_grouped(
        &self,
        products: &mut [Product<'_, CudaMatrix>],
    ) -> Result<()> {
        let mut inputs = Staged::default();
        let mut at = Vec::with_capacity(products.len());
        let mut outputs = 0;
        for p in products.iter() {
            let x = &p.x[..p.m * p.w.cols];
            at.push((inputs.push(x, p.w.takes_bf16(p.m)), outputs));
            outputs += p.m * p.w.rows;
        }
        if outputs == 0 {
            return Ok(());
        }
        let inputs = self.upload_staged(inputs)?;
        let mut y = self.alloc::<f32>(outputs)?;
        let mut run = Enqueued::default();
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let y_p = ptr_mut(&mut y, &self.stream);
            let group: Vec<_> = (products.iter().zip(&at))
                .map(|(p, &(x_at, y_at))| {
                    let x = inputs.at(&self.stream, x_at);
                    (p.w, p.m, x, y_p + (y_at * 4) as u64)
                })
                .collect();
            self.enqueue_products(&blas, &mut run, &group)?;
        }
        let host = self.download(&y, outputs, run)?;
        for (p, &(_, y_at)) in products.iter_mut().zip(&at) {
            let len = p.m * p.w.rows;
            p.out[..len].copy_from_slice(&host[y_at..y_at + len]);
        }
        Ok(())
    }

    /// The MLPs of `runs` in one round trip: one upload of their inputs; every run's `gate_up`
    /// product, `silu_mul` into f32 or bf16 (whichever its `down` takes; one launch for runs
    /// whose rows follow one another), every run's `down` product, with the intermediate
    /// activations left on the GPU; one download. FP8 products of a few rows are one launch
    /// per phase ([`Self::enqueue_products`]).
    pub(super) fn try_mlp_grouped(&self, runs: &mut [MlpRun<'_, CudaMatrix>]) -> Result<()> {
        let mut inputs = Staged::default();
        // Per run: its input, gate_up output, activation and output offsets.
        let mut at = Vec::with_capacity(runs.len());
        let (mut gate_ups, mut acts, mut acts_bf16, mut outputs) = (0, 0, 0, 0);
        for r in runs.iter() {
            let width = r.down.cols;
            if r.gate_up.rows != 2 * width || r.gate_up.cols != r.down.rows {
                return Err(Error::Device(format!(
                    "an MLP of gate_up {}×{} and down {}×{width} does not chain",
                    r.gate_up.rows, r.gate_up.cols, r.down.rows
                )));
            }
            let x_at = inputs.push(&r.x[..r.m * r.gate_up.cols], r.gate_up.takes_bf16(r.m));
            let act_at = if r.down.takes_bf16(r.m) {
                acts_bf16 += r.m * width;
                Staged::BF16 | (acts_bf16 - r.m * width)
            } else {
                acts += r.m * width;
                acts - r.m * width
            };
            at.push((x_at, gate_ups, act_at, outputs));
            gate_ups += r.m * 2 * width;
            outputs += r.m * r.down.rows;
        }
        if outputs == 0 {
            return Ok(());
        }
        let kernels = &self.kernels;
        let inputs = self.upload_staged(inputs)?;
        let mut gate_up = self.alloc::<f32>(gate_ups)?;
        let mut act = self.alloc::<f32>(acts)?;
        let mut act_bf16 = self.alloc::<u16>(acts_bf16)?;
        let mut y = self.alloc::<f32>(outputs)?;
        let mut run = Enqueued::default();
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let gate_up_p = ptr_mut(&mut gate_up, &self.stream);
            let act_p = ptr_mut(&mut act, &self.stream);
            let act_bf16_p = ptr_mut(&mut act_bf16, &self.stream);
            let y_p = ptr_mut(&mut y, &self.stream);
            // Every gate_up product, then every SiLU-and-multiply, then every down product:
            // the FP8 products of each phase are one launch.
            let mut gate_ups = Vec::with_capacity(runs.len());
            let mut downs = Vec::with_capacity(runs.len());
            for (r, &(x_at, gu_at, act_at, y_at)) in runs.iter().zip(&at) {
                let gu = gate_up_p + (gu_at * 4) as u64;
                gate_ups.push((r.gate_up, r.m, inputs.at(&self.stream, x_at), gu));
                let act = if act_at & Staged::BF16 != 0 {
                    Activations {
                        f32: 0,
                        bf16: act_bf16_p + ((act_at & !Staged::BF16) * 2) as u64,
                    }
                } else {
                    Activations {
                        f32: act_p + (act_at * 4) as u64,
                        bf16: 0,
                    }
                };
                downs.push((r.down, r.m, act, y_p + (y_at * 4) as u64));
            }
            self.enqueue_products(&blas, &mut run, &gate_ups)?;
            // SiLU-and-multiply once per span of runs whose rows lie one after another at the
            // same width, in both buffers: the experts of a layer are one span.
            let mut spans: Vec<(CUdeviceptr, Activations, usize, usize)> = Vec::new();
            for (&(_, m, _, gu), &(down, _, act, _)) in gate_ups.iter().zip(&downs) {
                let width = down.cols;
                if m == 0 {
                    continue;
                }
                if let Some((first_gu, first_act, rows, w)) = spans.last_mut() {
                    let follows = |start: CUdeviceptr, next: CUdeviceptr, bytes: usize| {
                        start != 0 && next == start + (*rows * bytes) as u64
                    };
                    if *w == width
                        && follows(*first_gu, gu, 2 * width * 4)
                        && (follows(first_act.f32, act.f32, width * 4)
                            || follows(first_act.bf16, act.bf16, width * 2))
                    {
                        *rows += m;
                        continue;
                    }
                }
                spans.push((gu, act, m, width));
            }
            for (gu, act, rows, width) in spans {
                let (rows_i, cols) = (dim(rows)?, dim(width)?);
                let mut launch = self.stream.launch_builder(&kernels.silu_mul);
                launch
                    .arg(&gu)
                    .arg(&act.f32)
                    .arg(&act.bf16)
                    .arg(&rows_i)
                    .arg(&cols);
                self.transfers.launched();
                // SAFETY: silu_mul(gate_up, out_f32, out_bf16, rows, width) reads rows × 2·width
                // values at `gu` and writes rows × width values to the one output that is not
                // null; the span's runs' slices of the buffers hold them, one after another.
                unsafe { launch.launch(launch_config(grid::elementwise(rows * width))) }
                    .map_err(driver)?;
            }
            self.enqueue_products(&blas, &mut run, &downs)?;
        }
        let host = self.download(&y, outputs, run)?;
        for (r, &(_, _, _, y_at)) in runs.iter_mut().zip(&at) {
            let len = r.m * r.down.rows;
            r.out[..len].copy_from_slice(&host[y_at..y_at + len]);
        }
        Ok(())
    }

    /// Enqueues independent products `(w, m, x, y)` as [`Self::enqueue_product`] does, in as
    /// few launches as their shapes allow: the FP8 ones of at most [`FP8_GEMV_ROWS`] rows
    /// together in one `fp8_gemv_grouped` launch (per [`grid::FP8_GEMV_GROUP`] of them), and
    /// the f32 and bf16 ones of one shape in one batched cuBLAS call (attention's heads, and a
    /// MoE layer's experts where each took as many rows). Their tables go into `run`.
    pub(super) fn enqueue_products(
        &self,
        blas: &CudaBlas,
        run: &mut Enqueued,
        products: &[(&CudaMatrix, usize, Activations, CUdeviceptr)],
    ) -> Result<()> {
        let mut grouped = Vec::new();
        // Per (bf16, n, k, m): the weights', inputs' and outputs' addresses.
        type Batch = ((bool, usize, usize, usize), Vec<[CUdeviceptr; 3]>);
        let mut batches: Vec<Batch> = Vec::new();
        let mut batch = |key, addresses| match batches.iter_mut().find(|(k, _)| *k == key) {
            Some((_, all)) => all.push(addresses),
            None => batches.push((key, vec![addresses])),
        };
        for &(w, m, x, y) in products {
            if m * w.rows == 0 {
                continue;
            }
            let key = |bf16| (bf16, w.rows, w.cols, m);
            match &w.data {
                DeviceWeights::Fp8 {
                    codes,
                    scales,
                    block,
                    ..
                } if m <= FP8_GEMV_ROWS => grouped.push(Fp8Product {
                    w: codes.device_ptr(&self.stream).0,
                    scales: scales.device_ptr(&self.stream).0,
                    x: x.f32,
                    y,
                    n: dim(w.rows)?,
                    k: dim(w.cols)?,
                    m: dim(m)?,
                    br: dim(block.0)?,
                    bc: dim(block.1)?,
                }),
                DeviceWeights::F32(wd) => {
                    batch(key(false), [wd.device_ptr(&self.stream).0, x.f32, y])
                }
                DeviceWeights::Bf16(wd) => {
                    batch(key(true), [wd.device_ptr(&self.stream).0, x.bf16, y])
                }
                DeviceWeights::Fp8 { .. } => self.enqueue_product(blas, run, w, m, x, y)?,
            }
        }
        for ((bf16, n, k, m), addresses) in batches {
            let shape = Shape { n, m, k };
            let dtype = if bf16 {
                sys::cudaDataType_t::CUDA_R_16BF
            } else {
                sys::cudaDataType_t::CUDA_R_32F
            };
            self.transfers.launched();
            if let [[w, x, y]] = addresses[..] {
                // SAFETY: `w` holds the n × k weights of `dtype`, `x` m × k activations of it
                // and `y` m × n f32 outputs (the callers' word), all on this stream.
                unsafe { gemm(blas, shape, dtype, w, x, y) }?;
                continue;
            }
            // The weights' addresses, then the inputs', then the outputs'.
            let table: Vec<CUdeviceptr> = (0..3)
                .flat_map(|i| addresses.iter().map(move |a| a[i]))
                .collect();
            let table = self.stream.clone_htod(&table).map_err(driver)?;
            let table_p = table.device_ptr(&self.stream).0;
            // SAFETY: the table lists, for each product, n × k weights of `dtype`, m × k
            // activations of it and m × n f32 outputs (the callers' word), all on this stream.
            unsafe { gemm_batched(blas, shape, dtype, table_p, addresses.len()) }?;
            run.tables.push(table);
        }
        for chunk in grouped.chunks(grid::FP8_GEMV_GROUP) {
            let most_rows = chunk.iter().map(|p| p.n as usize).max().unwrap_or(0);
            let table = self.stream.clone_htod(chunk).map_err(driver)?;
            let table_p = table.device_ptr(&self.stream).0;
            let config = launch_config(grid::fp8_gemv_grouped(most_rows, chunk.len()));
            let mut launch = self.stream.launch_builder(&self.kernels.fp8_gemv_grouped);
            launch.arg(&table_p);
            self.transfers.launched();
            // SAFETY: fp8_gemv_grouped(products) runs fp8_gemv for each entry of the table,
            // one per block row of the grid: each entry's weight, scales, inputs and outputs
            // are buffers of its product's size on this stream, as for fp8_gemv.
            unsafe { launch.launch(config) }.map_err(driver)?;
            run.products.push(table);
        }
        Ok(())
    }

    /// Enqueues `y[m, n] = x[m, k] · wᵀ`, with `x` in f32 or bf16 as [`CudaMatrix::takes_bf16`]
    /// says and `y` in f32; a dequantised FP8 weight it makes goes into `run`, to live until the
    /// stream has run.
    pub(super) fn enqueue_product(
        &self,
        blas: &CudaBlas,
        run: &mut Enqueued,
        w: &CudaMatrix,
        m: usize,
        x: Activations,
        y: CUdeviceptr,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        if m * n == 0 {
            return Ok(());
        }
        let shape = Shape { n, m, k };
        let product = |w: CUdeviceptr, dtype, x: CUdeviceptr| {
            self.transfers.launched();
            // SAFETY: every caller passes `w` with the n × k weights of `dtype`, and `x` with
            // m × k activations of it; `y` has m × n f32 outputs; all on this stream.
            unsafe { gemm(blas, shape, dtype, w, x, y) }
        };
        match &w.data {
            DeviceWeights::F32(wd) => {
                let (wp, _w) = wd.device_ptr(&self.stream);
                product(wp, sys::cudaDataType_t::CUDA_R_32F, x.f32)
            }
            DeviceWeights::Bf16(wd) => {
                let (wp, _w) = wd.device_ptr(&self.stream);
                product(wp, sys::cudaDataType_t::CUDA_R_16BF, x.bf16)
            }
            DeviceWeights::Fp8 {
                codes,
                scales,
                block,
                ..
            } if m <= FP8_GEMV_ROWS => self.fp8_gemv(shape, (codes, scales, *block), x.f32, y),
            DeviceWeights::Fp8 {
                codes,
                scales,
                tensor_cores: true,
                ..
            } => self.fp8_on_tensor_cores(run, shape, (codes, scales), x.f32, y),
            DeviceWeights::Fp8 {
                codes,
                scales,
                block,
                ..
            } => {
                let wide = self.fp8_to_bf16((n, k), (codes, scales, *block))?;
                let (wp, reading) = wide.device_ptr(&self.stream);
                product(wp, sys::cudaDataType_t::CUDA_R_16BF, x.bf16)?;
                drop(reading);
                run.scratch.push(wide);
                Ok(())
            }
        }
    }

    /// Enqueues `y[m, n] = x[m, k] · wᵀ` for an FP8 weight of 128 × 128 blocks on tensor
    /// cores: `x` (f32 on the GPU) quantised to FP8 by `quantize_fp8_rows` in 1 × 128 blocks,
    /// then cuBLASLt's block-scaled product; the quantised activations go into `run`.
    fn fp8_on_tensor_cores(
        &self,
        run: &mut Enqueued,
        shape: Shape,
        (codes, scales): (&CudaSlice<u8>, &CudaSlice<f32>),
        x: CUdeviceptr,
        y: CUdeviceptr,
    ) -> Result<()> {
        let Some(cores) = &self.fp8_tensor_cores else {
            return Err(Error::Device(
                "an FP8 weight for tensor cores the GPU has not".into(),
            ));
        };
        let Shape { m, k, .. } = shape;
        let blocks = k.div_ceil(grid::FP8_ACTIVATION_BLOCK);
        let mut x_codes = self.alloc::<u8>(m * k)?;
        let mut x_scales = self.alloc::<f32>(m * blocks)?;
        let (x_codes_p, x_scales_p) = (
            ptr_mut(&mut x_codes, &self.stream),
            ptr_mut(&mut x_scales, &self.stream),
        );
        let (rows, cols) = (dim(m)?, dim(k)?);
        let mut launch = self.stream.launch_builder(&self.kernels.quantize_fp8_rows);
        launch
            .arg(&x)
            .arg(&rows)
            .arg(&cols)
            .arg(&x_codes_p)
            .arg(&x_scales_p);
        self.transfers.launched();
        // SAFETY: quantize_fp8_rows(x, rows, k, codes, scales) reads m × k values and writes
        // m × k codes and m × blocks scales: the buffers hold them, on this stream.
        unsafe { launch.launch(launch_config(grid::quantize_fp8_rows(m, k))) }.map_err(driver)?;
        let w = (
            codes.device_ptr(&self.stream).0,
            scales.device_ptr(&self.stream).0,
        );
        self.transfers.launched();
        // SAFETY: the weight holds n × k codes and its block scales, the quantised rows and
        // their scales were just written, and `y` holds m × n values (the caller's word).
        unsafe { cores.matmul(&self.stream, shape, w, (x_codes_p, x_scales_p), y) }?;
        run.bytes.extend(x_codes);
        run.floats.extend(x_scales);
        Ok(())
    }

    /// Enqueues `y[m, n] = x[m, k] · wᵀ` for an FP8 weight and at most [`FP8_GEMV_ROWS`]
    /// rows, in f32, reading the weight at one byte a value; `x` and `y` are f32 on the GPU.
    pub(super) fn fp8_gemv(
        &self,
        Shape { n, m, k }: Shape,
        (codes, scales, block): (&CudaSlice<u8>, &CudaSlice<f32>, (usize, usize)),
        x: CUdeviceptr,
        y: CUdeviceptr,
    ) -> Result<()> {
        let kernels = &self.kernels;
        let (rows, cols, m) = (dim(n)?, dim(k)?, dim(m)?);
        let (br, bc) = (dim(block.0)?, dim(block.1)?);
        let (codes_p, _c) = codes.device_ptr(&self.stream);
        let (scales_p, _s) = scales.device_ptr(&self.stream);
        let config = launch_config(grid::fp8_gemv(n));
        let mut launch = self.stream.launch_builder(&kernels.fp8_gemv);
        launch.arg(&codes_p).arg(&scales_p).arg(&x).arg(&y);
        launch.arg(&rows).arg(&cols).arg(&m).arg(&br).arg(&bc);
        self.transfers.launched();
        // SAFETY: fp8_gemv(w, scales, x, y, n, k, m, br, bc) reads n × k codes, the scale grid
        // of their blocks and m × k activations from x, and writes m × n values from y: the
        // caller's buffers hold them.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(())
    }

    /// Enqueues the dequantisation of an FP8 weight `[n, k]` to bf16, into a new buffer.
    pub(super) fn fp8_to_bf16(
        &self,
        (n, k): (usize, usize),
        (codes, scales, block): (&CudaSlice<u8>, &CudaSlice<f32>, (usize, usize)),
    ) -> Result<CudaSlice<u16>> {
        let mut wide: CudaSlice<u16> = self.stream.alloc_zeros(n * k).map_err(driver)?;
        let kernels = &self.kernels;
        let (rows, cols) = (dim(n)?, dim(k)?);
        let (br, bc) = (dim(block.0)?, dim(block.1)?);
        let config = launch_config(grid::elementwise(n * k));
        let mut launch = self.stream.launch_builder(&kernels.fp8_to_bf16);
        launch.arg(codes).arg(scales).arg(&mut wide);
        launch.arg(&rows).arg(&cols).arg(&br).arg(&bc);
        self.transfers.launched();
        // SAFETY: fp8_to_bf16(w, scales, out, rows, cols, br, bc) reads n × k codes and the
        // scale grid of their blocks, and writes n × k values of `wide`.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(wide)
    }
}

/// One product of `fp8_gemv_grouped`, laid out as `nvrtc.cu`'s `Fp8Product`: device addresses
/// of the weight's codes and scales, the f32 inputs and outputs, and `fp8_gemv`'s sizes.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Fp8Product {
    w: CUdeviceptr,
    scales: CUdeviceptr,
    x: CUdeviceptr,
    y: CUdeviceptr,
    n: i32,
    k: i32,
    m: i32,
    br: i32,
    bc: i32,
}

// SAFETY: plain data in the kernel's C layout (four addresses, five ints), copied as bytes.
unsafe impl cudarc::driver::DeviceRepr for Fp8Product {}
