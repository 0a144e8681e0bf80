//! The parts of an attention block before its attention on the GPU: the query path
//! (`linear_norm_linear`), and the whole block in one round trip (`attention_block`): the input
//! products, `rms_norm`, `rope_rotate` and the new cache rows appended to their pages; in a MoE
//! layer, with the residual, the post-attention norm and the gate's routing after it in the
//! same round trip (`attention_block_routed`).

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::routing::{routes_of, routes_on_the_gpu};
use super::{
    dim, driver, launch_config, ptr_mut, Activations, CudaBackend, CudaMatrix, Enqueued, Staged,
    Uploaded,
};
use crate::backend::cuda_pages::CudaRows;
use crate::backend::grid;
use crate::backend::routing::block_then_route_by_parts;
use crate::backend::{AttentionBlock, BlockRun, Rotation, Route, ThenRoute};
use crate::error::{Error, Result};

impl CudaBackend {
    /// [`Backend::attention_block`](crate::backend::Backend::attention_block) on the GPU in one
    /// round trip: [`Self::enqueue_attention_block`], one download and one wait.
    pub(super) fn try_attention_block(
        &self,
        b: &AttentionBlock<'_, CudaMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, CudaRows>],
        out: &mut [f32],
    ) -> Result<()> {
        let mut run = Enqueued::default();
        let staged = Staged::default();
        let Some((inputs, result, len)) =
            self.enqueue_attention_block(b, x, rotation, runs, staged, &mut run)?
        else {
            return Ok(());
        };
        let host = self.download(&result, len, run)?;
        drop(inputs);
        out[..len].copy_from_slice(&host);
        Ok(())
    }

    /// [`Backend::attention_block_routed`](crate::backend::Backend::attention_block_routed) on
    /// the GPU in one round trip: the residual, the post-attention norm's weights (and the
    /// gate's correction bias) uploaded with the block's inputs; [`Self::enqueue_attention_block`];
    /// `add_into` of its output into the residual; `rms_norm` of that (into f32, and into bf16
    /// too where the gate takes bf16); [`Self::enqueue_route`]; downloads of the residual, the
    /// normalised rows and the routes, and one wait. Where `gate_route` does not take the gate,
    /// it all runs by parts ([`block_then_route_by_parts`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn try_attention_block_routed(
        &self,
        b: &AttentionBlock<'_, CudaMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, CudaRows>],
        then: &ThenRoute<'_, CudaMatrix>,
        residual: &mut [f32],
        normed: &mut [f32],
    ) -> Result<Vec<Route>> {
        let router = &then.router;
        let n: usize = runs.iter().map(|r| r.queries).sum();
        if !routes_on_the_gpu(router)? || router.top_k == 0 || n == 0 {
            let by_parts =
                block_then_route_by_parts(self, b, x, rotation, runs, then, residual, normed);
            return Ok(by_parts);
        }
        let hidden = then.norm.len();
        let fits = b.attention.o_proj.is_some_and(|o| o.rows == hidden)
            && router.weight.cols == hidden
            && residual.len() >= n * hidden
            && normed.len() >= n * hidden;
        if !fits {
            return Err(Error::Device(format!(
                "an attention block and a gate around a residual of {hidden} columns that do \
                 not fit it"
            )));
        }
        let mut staged = Staged::default();
        let residual_at = staged.push(&residual[..n * hidden], false);
        let norm_at = staged.push(then.norm, false);
        let bias_at = router.correction_bias.map(|bias| staged.push(bias, false));
        let mut run = Enqueued::default();
        let Some((inputs, result, len)) =
            self.enqueue_attention_block(b, x, rotation, runs, staged, &mut run)?
        else {
            return Err(Error::Device(
                "an attention block of no heads before a gate".into(),
            ));
        };
        let at = |offset| inputs.at(&self.stream, offset).f32;
        let residual_p = at(residual_at);
        let result_p = result.as_ref().map_or(0, |r| r.device_ptr(&self.stream).0);
        let total = i64::try_from(len).map_err(|_| Error::Device(format!("{len} > i64::MAX")))?;
        let mut launch = self.stream.launch_builder(&self.kernels.add_into);
        launch.arg(&residual_p).arg(&result_p).arg(&total);
        self.transfers.launched();
        // SAFETY: add_into(y, x, len) adds len values of x into y: the residual uploaded above
        // and the block's output hold n × hidden values each, on this stream.
        unsafe { launch.launch(launch_config(grid::elementwise(len))) }.map_err(driver)?;
        let norm = (at(norm_at), then.eps);
        // The normalised rows in f32 for the host, and in bf16 too where the gate takes bf16.
        let mut rows = self.alloc::<f32>(n * hidden)?;
        let bf16_len = if router.weight.takes_bf16(n) {
            n * hidden
        } else {
            0
        };
        let mut rows_bf16 = self.alloc::<u16>(bf16_len)?;
        let both = Activations {
            f32: ptr_mut(&mut rows, &self.stream),
            bf16: ptr_mut(&mut rows_bf16, &self.stream),
        };
        self.rms_norm((residual_p, hidden), norm, both, (n, hidden))?;
        let gate_x = match both.bf16 {
            0 => both,
            _ => Activations { f32: 0, ..both },
        };
        let bias_p = bias_at.map_or(0, at);
        let routes = self.enqueue_route(&mut run, router, gate_x, bias_p, n)?;
        if let (Some(wide), Some(rows)) = (&inputs.wide, &rows) {
            let summed = wide.slice(residual_at..residual_at + n * hidden);
            self.stream
                .memcpy_dtoh(&summed, &mut residual[..n * hidden])
                .map_err(driver)?;
            self.stream
                .memcpy_dtoh(rows, &mut normed[..n * hidden])
                .map_err(driver)?;
            self.transfers.copied_down(2 * n * hidden * 4);
        }
        run.floats.extend(result);
        run.scratch.extend(rows_bf16);
        let host = self.download(&routes, 2 * n * router.top_k, run)?;
        drop((inputs, rows));
        Ok(routes_of(&host, n, router.top_k))
    }

    /// Enqueues MLA's whole attention block: one upload of `staged` (what the caller put there
    /// first) with the hidden states, both norms' weights and the step's rotation table; the
    /// stacked input product; q's `rms_norm` and `q_b` product; `rope_rotate` of the queries;
    /// the cache rows (`rms_norm` of the latent, `heads_copy`, `rope_rotate` of the shared key)
    /// appended to each run's pages from the GPU; [`Self::enqueue_absorbed`]. Returns the
    /// uploaded inputs, the result and its length (`None` for no rows or heads); what the work
    /// reads goes into `run`.
    fn enqueue_attention_block(
        &self,
        b: &AttentionBlock<'_, CudaMatrix>,
        x: &[f32],
        rotation: &Rotation,
        runs: &mut [BlockRun<'_, CudaRows>],
        mut staged: Staged,
        run: &mut Enqueued,
    ) -> Result<Option<(Uploaded, Buffer, usize)>> {
        let w = &b.attention;
        let (h, qk, lora, rope) = (w.uk_t.len(), w.nope + w.rope, w.lora, w.rope);
        let (width, pairs) = (lora + rope, rope / 2);
        let n: usize = runs.iter().map(|r| r.queries).sum();
        if n == 0 || h == 0 {
            return Ok(None);
        }
        let (input, q_b) = (b.input, b.q_b);
        let q_lora = q_b.cols;
        let shapes_agree = input.rows == q_lora + width
            && q_b.rows == h * qk
            && b.q_norm.len() == q_lora
            && b.kv_norm.len() == lora
            && rope % 2 == 0
            && rotation.cos_sin.len() >= n * rope
            && runs.iter().all(|r| r.rows.width() == width);
        if !shapes_agree {
            return Err(Error::Device(format!(
                "an attention block of {h} heads (q_lora {q_lora}, lora {lora}, rope {rope}) \
                 with weights, norms, rotation or caches of other shapes"
            )));
        }
        let x_at = staged.push(&x[..n * input.cols], input.takes_bf16(n));
        let q_norm_at = staged.push(b.q_norm, false);
        let kv_norm_at = staged.push(b.kv_norm, false);
        let rotation_at = staged.push(&rotation.cos_sin[..n * rope], false);
        let inputs = self.upload_staged(staged)?;
        let at = |offset| inputs.at(&self.stream, offset).f32;
        // [q_a | kv_a] = x · inputᵀ ([n, q_lora + lora + rope]), and the queries
        // q_b(rms_norm(q_a)), then their rotary columns rotated.
        let x_dev = inputs.at(&self.stream, x_at);
        let norm = (at(q_norm_at), b.eps);
        let (mut stacked, mut q) =
            self.enqueue_linear_norm_linear(run, (input, q_b), x_dev, norm, n)?;
        let stacked_p = ptr_mut(&mut stacked, &self.stream);
        let q_p = ptr_mut(&mut q, &self.stream);
        let rotation_p = at(rotation_at);
        let angles = (rotation_p, pairs, rotation.interleave);
        self.rope_rotate((q_p, h * qk, qk, w.nope), (n, h), angles)?;
        // The cache rows [n, lora + rope]: the latent normalised, the shared key rotated.
        let mut kv = self.alloc::<f32>(n * width)?;
        let kv_p = ptr_mut(&mut kv, &self.stream);
        let kv_a_p = stacked_p + (q_lora * 4) as u64;
        let mut latent = self.alloc::<f32>(n * lora)?;
        let latent_p = ptr_mut(&mut latent, &self.stream);
        let norm = (at(kv_norm_at), b.eps);
        let into_latent = Activations {
            f32: latent_p,
            bf16: 0,
        };
        self.rms_norm((kv_a_p, input.rows), norm, into_latent, (n, lora))?;
        let kv_layout = (width, 0, 0);
        self.heads_copy((latent_p, lora, 0, 0), ((kv_p, 0), kv_layout), (n, 1, lora))?;
        let k_pe = (kv_a_p, input.rows, 0, lora);
        self.heads_copy(k_pe, ((kv_p, 0), (width, 0, lora)), (n, 1, rope))?;
        self.rope_rotate((kv_p, width, 0, lora), (n, 1), angles)?;
        let mut sequences = Vec::with_capacity(runs.len());
        let mut row = 0;
        for r in runs.iter_mut() {
            let src = kv_p + (row * width * 4) as u64;
            let paged_rows = &self.kernels.paged_rows;
            let table = r
                .rows
                .append_device(&self.stream, paged_rows, src, r.queries)?;
            run.tables.extend(table);
            row += r.queries;
        }
        for r in runs.iter() {
            sequences.push((r.queries, &*r.rows, r.position));
        }
        let (result, len) = self.enqueue_absorbed(w, q_p, &sequences, run)?;
        run.floats
            .extend([stacked, q, kv, latent].into_iter().flatten());
        Ok(Some((inputs, result, len)))
    }

    /// [`Backend::linear_norm_linear`](crate::backend::Backend::linear_norm_linear) on the GPU in
    /// one round trip: one upload of `x` and the norm's weights, the first product, `rms_norm` into
    /// f32 or bf16 as `b` takes it, the second product, two downloads and one wait.
    pub(super) fn try_linear_norm_linear(
        &self,
        x: &[f32],
        m: usize,
        (a, b): (&CudaMatrix, &CudaMatrix),
        (norm, eps): (&[f32], f32),
        first: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        let cols = b.cols;
        if m == 0 {
            return Ok(());
        }
        if cols > a.rows || norm.len() != cols {
            return Err(Error::Device(format!(
                "a norm of {} over {cols} of {} columns",
                norm.len(),
                a.rows
            )));
        }
        let mut inputs = Staged::default();
        let x_at = inputs.push(&x[..m * a.cols], a.takes_bf16(m));
        let norm_at = inputs.push(norm, false);
        let inputs = self.upload_staged(inputs)?;
        let mut run = Enqueued::default();
        let x = inputs.at(&self.stream, x_at);
        let norm = (inputs.at(&self.stream, norm_at).f32, eps);
        let (y, z) = self.enqueue_linear_norm_linear(&mut run, (a, b), x, norm, m)?;
        if let Some(y) = &y {
            self.stream
                .memcpy_dtoh(y, &mut first[..m * a.rows])
                .map_err(driver)?;
            self.transfers.copied_down(m * a.rows * 4);
        }
        let host = self.download(&z, m * b.rows, run)?;
        out[..m * b.rows].copy_from_slice(&host);
        drop((inputs, y));
        Ok(())
    }

    /// Enqueues `first = x · aᵀ` (`[m, a.rows]`), `rms_norm` of its first `b.cols` columns with
    /// the weights at `norm` into f32 or bf16 as `b` takes them, and `second = normed · bᵀ`
    /// (`[m, b.rows]`): MLA's query path. Returns `first` and `second`; the normalised rows go
    /// into `run`.
    fn enqueue_linear_norm_linear(
        &self,
        run: &mut Enqueued,
        (a, b): (&CudaMatrix, &CudaMatrix),
        x: Activations,
        norm: (CUdeviceptr, f32),
        m: usize,
    ) -> Result<(Buffer, Buffer)> {
        let cols = b.cols;
        let bf16 = b.takes_bf16(m);
        let mut first = self.alloc::<f32>(m * a.rows)?;
        let mut normed = self.alloc::<f32>(if bf16 { 0 } else { m * cols })?;
        let mut normed_bf16 = self.alloc::<u16>(if bf16 { m * cols } else { 0 })?;
        let mut second = self.alloc::<f32>(m * b.rows)?;
        let first_p = ptr_mut(&mut first, &self.stream);
        let normed_x = Activations {
            f32: ptr_mut(&mut normed, &self.stream),
            bf16: ptr_mut(&mut normed_bf16, &self.stream),
        };
        let second_p = ptr_mut(&mut second, &self.stream);
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        self.enqueue_product(&blas, run, a, m, x, first_p)?;
        self.rms_norm((first_p, a.rows), norm, normed_x, (m, cols))?;
        self.enqueue_product(&blas, run, b, m, normed_x, second_p)?;
        run.floats.extend(normed);
        run.scratch.extend(normed_bf16);
        Ok((first, second))
    }

    /// Enqueues `rms_norm` of the first `cols` values of `rows` rows at `x` (row stride
    /// `stride`) with the weights at `weight` into `out`'s f32 and bf16 buffers (each that is not
    /// 0; `[rows, cols]`).
    pub(super) fn rms_norm(
        &self,
        (x, stride): (CUdeviceptr, usize),
        (weight, eps): (CUdeviceptr, f32),
        out: Activations,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        let (stride, rows_i, cols_i) = (dim(stride)?, dim(rows)?, dim(cols)?);
        let mut launch = self.stream.launch_builder(&self.kernels.rms_norm);
        launch.arg(&x).arg(&stride).arg(&weight).arg(&eps);
        launch
            .arg(&out.f32)
            .arg(&out.bf16)
            .arg(&rows_i)
            .arg(&cols_i);
        self.transfers.launched();
        // SAFETY: rms_norm(x, stride, weight, eps, out_f32, out_bf16, rows, cols) reads rows
        // rows of `stride` values and `cols` weights, and writes rows × cols values to the
        // output that is not null; the callers' buffers hold them.
        unsafe { launch.launch(launch_config(grid::rms_norm(rows))) }.map_err(driver)?;
        Ok(())
    }

    /// Enqueues `rope_rotate` of columns `col ..` (`2 · pairs` of them) of every (row, head)
    /// of `rows × heads` at `x` (row and head strides given), by the table at `cos_sin`.
    pub(super) fn rope_rotate(
        &self,
        (x, row, head, col): (CUdeviceptr, usize, usize, usize),
        (rows, heads): (usize, usize),
        (cos_sin, pairs, interleave): (CUdeviceptr, usize, bool),
    ) -> Result<()> {
        let ints = [row, head, col, rows, heads, pairs].map(dim);
        let [row, head, col, rows_i, heads_i, pairs_i] = ints;
        let (row, head, col) = (row?, head?, col?);
        let (rows_i, heads_i, pairs_i) = (rows_i?, heads_i?, pairs_i?);
        let interleave = i32::from(interleave);
        let mut launch = self.stream.launch_builder(&self.kernels.rope_rotate);
        launch.arg(&x).arg(&row).arg(&head).arg(&col);
        launch.arg(&rows_i).arg(&heads_i).arg(&pairs_i);
        launch.arg(&cos_sin).arg(&interleave);
        self.transfers.launched();
        // SAFETY: rope_rotate(x, row, head, col, rows, heads, pairs, cos_sin, interleave)
        // rewrites 2 · pairs values of every (row, head) the strides reach and reads rows ×
        // pairs pairs of cos_sin: the callers' buffers hold them.
        unsafe { launch.launch(launch_config(grid::elementwise(rows * heads * pairs))) }
            .map_err(driver)?;
        Ok(())
    }
}

/// A buffer on the GPU; `None` where it would be empty.
type Buffer = Option<CudaSlice<f32>>;
