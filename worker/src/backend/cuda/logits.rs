//! The LM head on the GPU (`Backend::lm_head`): the product of the rows that want logits and,
//! for those whose samplers need only the best few, `logits_best` in the same round trip, so
//! that a greedy row sends back a few values, not the whole vocabulary's.

use cudarc::driver::PushKernelArg;

use super::{dim, driver, launch_config, ptr_mut, CudaBackend, CudaMatrix, Enqueued, Staged};
use crate::backend::grid::{self, LOGITS_BEST_MAX};
use crate::backend::logits::{lm_head_by_parts, BestLogits, RowLogits, Wants};
use crate::error::Result;

/// Token ids travel as floats, exact below 2^24.
const EXACT_IDS: usize = 1 << 24;

impl CudaBackend {
    /// [`Backend::lm_head`](crate::backend::Backend::lm_head) on the GPU: one upload of the rows
    /// that want logits (those that want the best few first), one product, `logits_best` of
    /// those rows, one download of their best and of the other rows' every logit, one wait.
    /// Where no row can take the best few (none asks, or more than [`LOGITS_BEST_MAX`] or the
    /// vocabulary), all logits come back ([`lm_head_by_parts`]).
    pub(super) fn try_lm_head(
        &self,
        x: &[f32],
        w: &CudaMatrix,
        wants: &[Wants],
    ) -> Result<Vec<RowLogits>> {
        let (vocab, hidden) = (w.rows, w.cols);
        let reduced = |want: &Wants| match *want {
            Wants::Best(k) => k <= LOGITS_BEST_MAX.min(vocab) && vocab < EXACT_IDS,
            _ => false,
        };
        let best: Vec<usize> = (0..wants.len()).filter(|&r| reduced(&wants[r])).collect();
        if best.is_empty() {
            return Ok(lm_head_by_parts(self, x, w, wants));
        }
        let all: Vec<usize> = (0..wants.len())
            .filter(|&r| wants[r] != Wants::Nothing && !reduced(&wants[r]))
            .collect();
        let k = (best.iter())
            .map(|&r| match wants[r] {
                Wants::Best(k) => k.max(1),
                _ => 1,
            })
            .max()
            .unwrap_or(1);
        let n = best.len() + all.len();
        let mut rows = Vec::with_capacity(n * hidden);
        for &r in best.iter().chain(&all) {
            rows.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        let mut staged = Staged::default();
        let x_at = staged.push(&rows, w.takes_bf16(n));
        let inputs = self.upload_staged(staged)?;
        let mut run = Enqueued::default();
        let mut logits = self.alloc::<f32>(n * vocab)?;
        let logits_p = ptr_mut(&mut logits, &self.stream);
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let x_dev = inputs.at(&self.stream, x_at);
            self.enqueue_product(&blas, &mut run, w, n, x_dev, logits_p)?;
        }
        let stride = 2 * k + 1;
        let len = best.len() * stride;
        let mut out = self.alloc::<f32>(len)?;
        let out_p = ptr_mut(&mut out, &self.stream);
        let (rows_i, vocab_i, k_i) = (dim(best.len())?, dim(vocab)?, dim(k)?);
        let mut launch = self.stream.launch_builder(&self.kernels.logits_best);
        launch
            .arg(&logits_p)
            .arg(&rows_i)
            .arg(&vocab_i)
            .arg(&k_i)
            .arg(&out_p);
        self.transfers.launched();
        // SAFETY: logits_best(logits, rows, vocab, k, out) reads the first rows × vocab logits
        // of the n × vocab above and writes rows × (2k + 1) values to `out`, on this stream.
        unsafe { launch.launch(launch_config(grid::logits_best(best.len()))) }.map_err(driver)?;
        let mut every = vec![0.0f32; all.len() * vocab];
        if let Some(logits) = logits.as_ref().filter(|_| !all.is_empty()) {
            let rest = logits.slice(best.len() * vocab..);
            self.stream.memcpy_dtoh(&rest, &mut every).map_err(driver)?;
            self.transfers.copied_down(every.len() * 4);
        }
        run.floats.extend(logits);
        let host = self.download(&out, len, run)?;
        drop(inputs);
        let mut rows = vec![RowLogits::Nothing; wants.len()];
        for (&r, got) in best.iter().zip(host.chunks_exact(stride)) {
            let take = match wants[r] {
                Wants::Best(k) => k,
                _ => 0,
            };
            rows[r] = RowLogits::Best(BestLogits {
                values: got[..take].to_vec(),
                ids: got[k..k + take].iter().map(|&id| id as u32).collect(),
                log_sum: got[2 * k],
            });
        }
        for (&r, logits) in all.iter().zip(every.chunks_exact(vocab)) {
            rows[r] = RowLogits::All(logits.to_vec());
        }
        Ok(rows)
    }
}
