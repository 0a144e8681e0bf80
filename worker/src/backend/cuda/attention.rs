//! MLA's absorbed attention on the GPU: the per-head products and the heads' rearrangements
//! (`heads_copy`), and attention over the sequences' paged caches (their rows gathered in one
//! launch, every sequence's scores and sums in one grouped cuBLAS call each, one
//! `causal_softmax` between).

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::blas::{gemm_f32_out, gemm_grouped, Problem, Shape};
use super::{dim, driver, launch_config, ptr_mut, Activations, CudaBackend, CudaMatrix, Enqueued};
use crate::backend::cuda_pages::{gather_all, CudaRows};
use crate::backend::grid;
use crate::backend::{Absorbed, AbsorbedRun, Attend};
use crate::error::{Error, Result};

/// Most attention scores (floats) one block of queries holds on the GPU.
const GPU_SCORE_BLOCK: usize = 1 << 26;

impl CudaBackend {
    /// [`Backend::attend_grouped`](crate::backend::Backend::attend_grouped) on the GPU: one upload
    /// of every sequence's queries, their attention ([`Self::enqueue_attention`]), one download of
    /// every output and one wait.
    pub(super) fn try_attend_grouped(
        &self,
        heads: usize,
        values: usize,
        scale: f32,
        runs: &mut [Attend<'_, CudaRows>],
    ) -> Result<()> {
        let mut queries = Vec::new();
        let mut outputs = 0;
        for r in runs.iter() {
            queries.extend_from_slice(&r.q[..r.queries * heads * r.rows.width()]);
            outputs += r.queries * heads * values;
        }
        if outputs == 0 {
            return Ok(());
        }
        let q_dev = self.stream.clone_htod(&queries).map_err(driver)?;
        self.transfers.upload(queries.len() * 4);
        let mut o_dev: CudaSlice<f32> = self.stream.alloc_zeros(outputs).map_err(driver)?;
        let sequences: Vec<_> = runs
            .iter()
            .map(|r| (r.queries, r.rows, r.position))
            .collect();
        let shape = (heads, values, scale);
        let q_p = q_dev.device_ptr(&self.stream).0;
        let o_p = o_dev.device_ptr_mut(&self.stream).0;
        let enqueued = self.enqueue_attention(shape, &sequences, q_p, o_p)?;
        let host = self.download(&Some(o_dev), outputs, enqueued)?;
        drop(q_dev);
        let mut at = 0;
        for r in runs.iter_mut() {
            let len = r.queries * heads * values;
            r.out[..len].copy_from_slice(&host[at..at + len]);
            at += len;
        }
        Ok(())
    }

    /// [`Backend::attend_absorbed`](crate::backend::Backend::attend_absorbed) on the GPU in one
    /// round trip: one upload of the queries, [`Self::enqueue_absorbed`], one download.
    pub(super) fn try_attend_absorbed(
        &self,
        w: &Absorbed<'_, CudaMatrix>,
        q: &[f32],
        runs: &[AbsorbedRun<'_, CudaRows>],
        out: &mut [f32],
    ) -> Result<()> {
        let (h, qk) = (w.uk_t.len(), w.nope + w.rope);
        let n: usize = runs.iter().map(|r| r.queries).sum();
        if n == 0 || h == 0 {
            return Ok(());
        }
        let q_dev = self.stream.clone_htod(&q[..n * h * qk]).map_err(driver)?;
        self.transfers.upload(n * h * qk * 4);
        let sequences: Vec<_> = runs
            .iter()
            .map(|r| (r.queries, r.rows, r.position))
            .collect();
        let mut run = Enqueued::default();
        let q_p = q_dev.device_ptr(&self.stream).0;
        let (result, len) = self.enqueue_absorbed(w, q_p, &sequences, &mut run)?;
        let host = self.download(&result, len, run)?;
        drop(q_dev);
        out[..len].copy_from_slice(&host);
        Ok(())
    }

    /// Enqueues MLA's absorbed attention of `sequences` (`(queries, cache, position)`) from
    /// their rotated queries at `q_p` (`[n, heads, nope + rope]`): per head the no-positional
    /// part (`heads_copy`) through `W_UKᵀ`; the absorbed queries put together (`heads_copy`);
    /// attention ([`Self::enqueue_attention`]); per head the latent output (`heads_copy`)
    /// through `W_UV`; the heads' values into `[n, heads, v]` (`heads_copy`), and through
    /// `o_proj` where the weights have it. Returns the result and its length; what the work
    /// reads goes into `run`.
    pub(super) fn enqueue_absorbed(
        &self,
        w: &Absorbed<'_, CudaMatrix>,
        q_p: CUdeviceptr,
        sequences: &[(usize, &CudaRows, usize)],
        run: &mut Enqueued,
    ) -> Result<(Option<CudaSlice<f32>>, usize)> {
        let (h, qk, lora, v) = (w.uk_t.len(), w.nope + w.rope, w.lora, w.v);
        let width = lora + w.rope;
        let n: usize = sequences.iter().map(|s| s.0).sum();
        let shapes_agree = w.uv.len() == h
            && w.uk_t.iter().all(|m| (m.rows, m.cols) == (lora, w.nope))
            && w.uv.iter().all(|m| (m.rows, m.cols) == (v, lora))
            && w.o_proj.is_none_or(|o| o.cols == h * v);
        if !shapes_agree {
            return Err(Error::Device(format!(
                "absorbed attention of {h} heads (nope {}, lora {lora}, v {v}) with weights of \
                 other shapes",
                w.nope
            )));
        }
        // Per head, W_UKᵀ q_nope: [h, n, lora].
        let nope = self.heads_inputs(&w.uk_t, n, (q_p, h * qk, qk, 0), w.nope)?;
        let mut absorbed = self.alloc::<f32>(h * n * lora)?;
        let abs_p = ptr_mut(&mut absorbed, &self.stream);
        self.per_head(&w.uk_t, n, &nope, (abs_p, lora), run)?;
        // The absorbed queries [n, h, lora + rope]: [W_UKᵀ q_nope | q_pe] per head.
        let mut q_abs = self.alloc::<f32>(n * h * width)?;
        let q_abs_p = ptr_mut(&mut q_abs, &self.stream);
        let to_q_abs = |col| ((q_abs_p, 0), (h * width, width, col));
        self.heads_copy((abs_p, lora, n * lora, 0), to_q_abs(0), (n, h, lora))?;
        self.heads_copy((q_p, h * qk, qk, w.nope), to_q_abs(lora), (n, h, w.rope))?;
        // Attention: latent outputs [n, h, lora].
        let mut o_lat = self.alloc::<f32>(n * h * lora)?;
        let o_lat_p = ptr_mut(&mut o_lat, &self.stream);
        let attended = self.enqueue_attention((h, lora, w.scale), sequences, q_abs_p, o_lat_p)?;
        run.keep(attended);
        // Per head, W_UV of its latent output: [h, n, v], then [n, h, v].
        let latents = self.heads_inputs(&w.uv, n, (o_lat_p, h * lora, lora, 0), lora)?;
        let mut values = self.alloc::<f32>(h * n * v)?;
        let values_p = ptr_mut(&mut values, &self.stream);
        self.per_head(&w.uv, n, &latents, (values_p, v), run)?;
        // The heads' values [n, h, v], in f32 or bf16 as `o_proj` takes them.
        let bf16 = w.o_proj.is_some_and(|o| o.takes_bf16(n));
        let mut y = self.alloc::<f32>(if bf16 { 0 } else { n * h * v })?;
        let mut y_bf16 = self.alloc::<u16>(if bf16 { n * h * v } else { 0 })?;
        let y_p = ptr_mut(&mut y, &self.stream);
        let y_bf16_p = ptr_mut(&mut y_bf16, &self.stream);
        let layout = (h * v, v, 0);
        self.heads_copy(
            (values_p, v, n * v, 0),
            ((y_p, y_bf16_p), layout),
            (n, h, v),
        )?;
        let result = match w.o_proj {
            Some(o_proj) => {
                let mut projected = self.alloc::<f32>(n * o_proj.rows)?;
                let p = ptr_mut(&mut projected, &self.stream);
                let x = Activations {
                    f32: y_p,
                    bf16: y_bf16_p,
                };
                let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
                self.enqueue_product(&blas, run, o_proj, n, x, p)?;
                run.floats.extend(y);
                (projected, n * o_proj.rows)
            }
            None => (y, n * h * v),
        };
        run.keep_inputs(nope);
        run.keep_inputs(latents);
        run.floats
            .extend([absorbed, q_abs, o_lat, values].into_iter().flatten());
        run.scratch.extend(y_bf16);
        Ok(result)
    }

    /// The inputs of per-head products with `weights` (`n` rows each): columns `col..` (`cols`
    /// of them) of every head of the activations at `src` (row and head strides given), as
    /// `[heads, n, cols]` in f32 and in bf16, each only where some weight takes it.
    pub(super) fn heads_inputs(
        &self,
        weights: &[&CudaMatrix],
        n: usize,
        src: (CUdeviceptr, usize, usize, usize),
        cols: usize,
    ) -> Result<HeadInputs> {
        let h = weights.len();
        let bf16 = weights.iter().any(|w| w.takes_bf16(n));
        let wide = weights.iter().any(|w| !w.takes_bf16(n));
        let mut inputs = HeadInputs {
            wide: if wide {
                self.alloc(h * n * cols)?
            } else {
                None
            },
            bf16: if bf16 {
                self.alloc(h * n * cols)?
            } else {
                None
            },
            cols,
        };
        let layout = (cols, n * cols, 0);
        if wide {
            let to = (ptr_mut(&mut inputs.wide, &self.stream), 0);
            self.heads_copy(src, (to, layout), (n, h, cols))?;
        }
        if bf16 {
            let to = (0, ptr_mut(&mut inputs.bf16, &self.stream));
            self.heads_copy(src, (to, layout), (n, h, cols))?;
        }
        Ok(inputs)
    }

    /// Enqueues head `i`'s product with `weights[i]` on its rows of `inputs`, into row block `i`
    /// of `[heads, n, out_width]` at `out.0` (`out.1` = `out_width`).
    pub(super) fn per_head(
        &self,
        weights: &[&CudaMatrix],
        n: usize,
        inputs: &HeadInputs,
        (out, out_width): (CUdeviceptr, usize),
        run: &mut Enqueued,
    ) -> Result<()> {
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let wide = inputs
            .wide
            .as_ref()
            .map_or(0, |d| d.device_ptr(&self.stream).0);
        let bf16 = inputs
            .bf16
            .as_ref()
            .map_or(0, |d| d.device_ptr(&self.stream).0);
        let products: Vec<_> = (weights.iter().enumerate())
            .map(|(head, &w)| {
                let at = head * n * inputs.cols;
                let x = Activations {
                    f32: if wide == 0 { 0 } else { wide + (at * 4) as u64 },
                    bf16: if bf16 == 0 { 0 } else { bf16 + (at * 2) as u64 },
                };
                (w, n, x, out + (head * n * out_width * 4) as u64)
            })
            .collect();
        self.enqueue_products(&blas, run, &products)
    }

    /// Enqueues `heads_copy`: `cols` columns of every (row, head) of `rows × heads` from `src`
    /// (address, row stride, head stride, first column) to the f32 or bf16 buffer of `dst`
    /// (whichever address is not 0) at its strides and first column.
    pub(super) fn heads_copy(
        &self,
        (src, src_row, src_head, src_col): (CUdeviceptr, usize, usize, usize),
        ((dst_f32, dst_bf16), (dst_row, dst_head, dst_col)): (
            (CUdeviceptr, CUdeviceptr),
            (usize, usize, usize),
        ),
        (rows, heads, cols): (usize, usize, usize),
    ) -> Result<()> {
        let ints = [
            src_row, src_head, src_col, dst_row, dst_head, dst_col, rows, heads, cols,
        ]
        .map(dim);
        let [sr, sh, sc, dr, dh, dc, r, h, c] = ints;
        let (sr, sh, sc, dr, dh, dc, r, h, c) = (sr?, sh?, sc?, dr?, dh?, dc?, r?, h?, c?);
        let mut launch = self.stream.launch_builder(&self.kernels.heads_copy);
        launch.arg(&src).arg(&sr).arg(&sh).arg(&sc);
        launch
            .arg(&dst_f32)
            .arg(&dst_bf16)
            .arg(&dr)
            .arg(&dh)
            .arg(&dc);
        launch.arg(&r).arg(&h).arg(&c);
        self.transfers.launched();
        // SAFETY: heads_copy(src, row, head, col, dst_f32, dst_bf16, row, head, col, rows,
        // heads, cols) reads and writes the rows × heads × cols elements the strides reach,
        // which the callers' buffers hold.
        unsafe { launch.launch(launch_config(grid::elementwise(rows * heads * cols))) }
            .map_err(driver)?;
        Ok(())
    }

    /// Enqueues the causal attention of `sequences` (`(queries, cache, position)`), whose
    /// queries lie in order at `q_p` (`[queries, heads, width]` each) and whose outputs go in
    /// order to `o_p` (`[queries, heads, values]` each): every sequence's cache gathered from
    /// its pages in one `paged_rows` launch ([`gather_all`]); then, for as many parts (a
    /// sequence, or a block of a long one's queries) at a time as [`GPU_SCORE_BLOCK`] scores
    /// allow, their scores in one grouped cuBLAS call, one `causal_softmax` and the weighted
    /// sums of the latents in one grouped call ([`Self::enqueue_problems`]). What the work reads
    /// comes back, to live until the stream has run it.
    pub(super) fn enqueue_attention(
        &self,
        (heads, values, scale): (usize, usize, f32),
        sequences: &[(usize, &CudaRows, usize)],
        q_p: CUdeviceptr,
        o_p: CUdeviceptr,
    ) -> Result<Enqueued> {
        let mut run = Enqueued::default();
        let live: Vec<_> = sequences.iter().filter(|s| s.0 > 0).copied().collect();
        let Some(&(_, first_rows, _)) = live.first() else {
            return Ok(run);
        };
        let width = first_rows.width();
        for &(queries, rows, position) in &live {
            let total = position + queries;
            if rows.len() < total || values > width || rows.width() != width {
                return Err(Error::Device(format!(
                    "attention over {} cached rows of {} for {total} positions, {values} values \
                     and queries of {width}",
                    rows.len(),
                    rows.width()
                )));
            }
        }
        let caches: Vec<_> = live.iter().map(|&(q, rows, p)| (rows, p + q)).collect();
        let (cache, table, starts) = gather_all(&self.stream, &self.kernels.paged_rows, &caches)?;
        let cache_p = cache.device_ptr(&self.stream).0;
        run.floats.push(cache);
        run.tables.push(table);
        // The parts, in order of their queries: a sequence, or a block of its queries whose
        // scores fit GPU_SCORE_BLOCK.
        let mut parts = Vec::new();
        let (mut q_at, mut o_at) = (q_p, o_p);
        for (&(queries, _, position), &start_row) in live.iter().zip(&starts) {
            let total = position + queries;
            let block = (GPU_SCORE_BLOCK / (heads * total).max(1)).clamp(1, queries);
            let mut start = 0;
            while start < queries {
                let n = block.min(queries - start);
                parts.push(Part {
                    q: q_at + (start * heads * width * 4) as u64,
                    o: o_at + (start * heads * values * 4) as u64,
                    cache: cache_p + (start_row * width * 4) as u64,
                    keys: position + start + n,
                    pairs: n * heads,
                    first: position + start + 1,
                });
                start += n;
            }
            q_at += (queries * heads * width * 4) as u64;
            o_at += (queries * heads * values * 4) as u64;
        }
        // Waves of consecutive parts whose scores fit GPU_SCORE_BLOCK together.
        let mut waves: Vec<&[Part]> = Vec::new();
        let mut rest = &parts[..];
        while !rest.is_empty() {
            let mut scores = 0;
            let fit = rest
                .iter()
                .take(grid::SOFTMAX_PARTS)
                .take_while(|p| {
                    scores += p.pairs * p.keys;
                    scores <= GPU_SCORE_BLOCK
                })
                .count()
                .max(1);
            let (wave, later) = rest.split_at(fit);
            waves.push(wave);
            rest = later;
        }
        let most_scores = (waves.iter())
            .map(|w| w.iter().map(|p| p.pairs * p.keys).sum::<usize>())
            .max()
            .unwrap_or(0);
        let mut scores: CudaSlice<f32> = self
            .stream
            .alloc_zeros(most_scores.max(1))
            .map_err(driver)?;
        let scores_p = scores.device_ptr_mut(&self.stream).0;
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        for wave in waves {
            let mut at = scores_p;
            let mut scores_of = Vec::with_capacity(wave.len());
            for p in wave {
                scores_of.push(at);
                at += (p.pairs * p.keys * 4) as u64;
            }
            // scores[pairs, keys] = q[pairs, width] · cache[keys, width]ᵀ.
            let products: Vec<Problem> = (wave.iter().zip(&scores_of))
                .map(|(p, &s)| {
                    let shape = Shape {
                        n: p.keys,
                        m: p.pairs,
                        k: width,
                    };
                    Problem::nt(shape, p.cache, p.q, s)
                })
                .collect();
            self.enqueue_problems(&blas, &mut run, &products)?;
            let softmax: Vec<SoftmaxPart> = (wave.iter().zip(&scores_of))
                .map(|(p, &s)| {
                    Ok(SoftmaxPart {
                        scores: s,
                        rows: dim(p.pairs)?,
                        cols: dim(p.keys)?,
                        heads: dim(heads)?,
                        first: dim(p.first)?,
                    })
                })
                .collect::<Result<_>>()?;
            let table = self.stream.clone_htod(&softmax).map_err(driver)?;
            let table_p = table.device_ptr(&self.stream).0;
            let most_rows = wave.iter().map(|p| p.pairs).max().unwrap_or(0);
            let mut launch = self.stream.launch_builder(&self.kernels.causal_softmax);
            launch.arg(&table_p).arg(&scale);
            self.transfers.launched();
            // SAFETY: causal_softmax(parts, scale) rewrites each listed part's rows × cols
            // scores, which the scores buffer holds at the part's address.
            unsafe { launch.launch(launch_config(grid::causal_softmax(most_rows, wave.len()))) }
                .map_err(driver)?;
            run.softmax.push(table);
            // out[pairs, values] = scores[pairs, keys] · cache[keys, ..values].
            let sums: Vec<Problem> = (wave.iter().zip(&scores_of))
                .map(|(p, &s)| {
                    Problem::nn(
                        (values, p.pairs, p.keys),
                        (p.cache, width),
                        (s, p.keys),
                        (p.o, values),
                    )
                })
                .collect();
            self.enqueue_problems(&blas, &mut run, &sums)?;
        }
        run.floats.push(scores);
        Ok(run)
    }

    /// Enqueues f32 `problems` of many shapes: one grouped cuBLAS call where the library has
    /// it (12.5 and later; the table of operands' addresses goes into `run`), one product each
    /// otherwise.
    fn enqueue_problems(
        &self,
        blas: &CudaBlas,
        run: &mut Enqueued,
        problems: &[Problem],
    ) -> Result<()> {
        if problems.is_empty() {
            return Ok(());
        }
        if !self.grouped_gemm || problems.len() == 1 {
            let f32s = sys::cudaDataType_t::CUDA_R_32F;
            for p in problems {
                self.transfers.launched();
                // SAFETY: each problem's operands hold the matrices their shapes describe, on
                // this stream (the callers' word).
                unsafe { gemm_f32_out(blas, (p.transpose_a, f32s), p.mnk, p.a, p.b, p.c) }?;
            }
            return Ok(());
        }
        let addresses: Vec<CUdeviceptr> = (problems.iter().map(|p| p.a.0))
            .chain(problems.iter().map(|p| p.b.0))
            .chain(problems.iter().map(|p| p.c.0))
            .collect();
        let table = self.stream.clone_htod(&addresses).map_err(driver)?;
        self.transfers.launched();
        // SAFETY: as above, and the table lists the problems' addresses; the backend checked
        // the library's version when it opened.
        unsafe { gemm_grouped(blas, problems, table.device_ptr(&self.stream).0) }?;
        run.tables.push(table);
        Ok(())
    }
}

/// A part of [`CudaBackend::enqueue_attention`]: `pairs` (query, head) rows of queries at `q`
/// over the first `keys` rows of a gathered cache at `cache`, the first query seeing `first`
/// of them; the outputs go to `o`.
struct Part {
    q: CUdeviceptr,
    o: CUdeviceptr,
    cache: CUdeviceptr,
    keys: usize,
    pairs: usize,
    first: usize,
}

/// One part of a `causal_softmax` launch, laid out as `nvrtc.cu`'s `SoftmaxPart`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct SoftmaxPart {
    scores: CUdeviceptr,
    rows: i32,
    cols: i32,
    heads: i32,
    first: i32,
}

// SAFETY: plain data in the kernel's C layout (an address, four ints), copied as bytes.
unsafe impl cudarc::driver::DeviceRepr for SoftmaxPart {}

/// The inputs of per-head products, `[heads, n, cols]`, in f32 and in bf16 where some weight
/// takes them so.
pub(super) struct HeadInputs {
    pub(super) wide: Option<CudaSlice<f32>>,
    pub(super) bf16: Option<CudaSlice<u16>>,
    cols: usize,
}
