//! A MoE gate on the GPU (`Backend::route`): its product and `gate_route` in one round trip,
//! so that the host receives each row's experts and weights, not the logits of every expert.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{
    dim, driver, launch_config, ptr_mut, Activations, CudaBackend, CudaMatrix, Enqueued, Staged,
};
use crate::backend::grid::{self, ROUTE_MAX_EXPERTS, ROUTE_MAX_GROUPS};
use crate::backend::routing::{route_by_parts, Route, Router};
use crate::config::TopkMethod;
use crate::error::{Error, Result};

impl CudaBackend {
    /// [`Backend::route`](crate::backend::Backend::route) on the GPU: one upload of `x` (and
    /// noaux_tc's correction bias), the gate's product, `gate_route`, one download of the
    /// routes and one wait. A gate beyond `gate_route`'s limits (more than
    /// [`ROUTE_MAX_EXPERTS`] experts or [`ROUTE_MAX_GROUPS`] groups) routes on the host.
    pub(super) fn try_route(
        &self,
        router: &Router<'_, CudaMatrix>,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<Route>> {
        if !routes_on_the_gpu(router)? {
            return Ok(route_by_parts(self, router, x, n));
        }
        if n == 0 || router.top_k == 0 {
            return Ok(vec![Route::default(); n]);
        }
        let w = router.weight;
        let mut staged = Staged::default();
        let x_at = staged.push(&x[..n * w.cols], w.takes_bf16(n));
        let bias_at = router.correction_bias.map(|b| staged.push(b, false));
        let inputs = self.upload_staged(staged)?;
        let mut run = Enqueued::default();
        let x_dev = inputs.at(&self.stream, x_at);
        let bias_p = bias_at.map_or(0, |at| inputs.at(&self.stream, at).f32);
        let out = self.enqueue_route(&mut run, router, x_dev, bias_p, n)?;
        let host = self.download(&out, 2 * n * router.top_k, run)?;
        drop(inputs);
        Ok(routes_of(&host, n, router.top_k))
    }

    /// Enqueues the gate's product of `n` rows at `x` and `gate_route` (with noaux_tc's
    /// correction bias at `bias`, 0 for none): returns the routes' buffer, `2 · n · top_k`
    /// values ([`routes_of`]); the logits go into `run`.
    pub(super) fn enqueue_route(
        &self,
        run: &mut Enqueued,
        router: &Router<'_, CudaMatrix>,
        x: Activations,
        bias: CUdeviceptr,
        n: usize,
    ) -> Result<Option<CudaSlice<f32>>> {
        let (w, experts, top_k) = (router.weight, router.experts, router.top_k);
        let mut logits = self.alloc::<f32>(n * experts)?;
        let logits_p = ptr_mut(&mut logits, &self.stream);
        {
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            self.enqueue_product(&blas, run, w, n, x, logits_p)?;
        }
        let mut out = self.alloc::<f32>(2 * n * top_k)?;
        let out_p = ptr_mut(&mut out, &self.stream);
        let ints = [n, experts, router.n_group, router.topk_group, top_k].map(dim);
        let [rows, experts_i, n_group, topk_group, top_k_i] = ints;
        let (rows, experts_i, n_group) = (rows?, experts_i?, n_group?);
        let (topk_group, top_k_i) = (topk_group?, top_k_i?);
        let method = grid::gate_route_method(router.method);
        let norm = i32::from(router.norm_topk_prob);
        let mut launch = self.stream.launch_builder(&self.kernels.gate_route);
        launch.arg(&logits_p).arg(&rows).arg(&experts_i).arg(&bias);
        launch
            .arg(&method)
            .arg(&n_group)
            .arg(&topk_group)
            .arg(&top_k_i);
        launch.arg(&norm).arg(&router.scaling).arg(&out_p);
        self.transfers.launched();
        // SAFETY: gate_route(logits, rows, experts, bias, method, n_group, topk_group, top_k,
        // norm, scaling, out) reads n × experts logits and (noaux_tc's) experts biases and
        // writes 2 × n × top_k values: the buffers above hold them, on this stream.
        unsafe { launch.launch(launch_config(grid::gate_route(n))) }.map_err(driver)?;
        run.floats.extend(logits);
        Ok(out)
    }
}

/// Whether `gate_route` takes `router` (at most [`ROUTE_MAX_EXPERTS`] experts and
/// [`ROUTE_MAX_GROUPS`] groups); an error where the gate's weight, groups or bias do not fit
/// its numbers.
pub(super) fn routes_on_the_gpu(router: &Router<'_, CudaMatrix>) -> Result<bool> {
    let (w, experts, top_k) = (router.weight, router.experts, router.top_k);
    let noaux = router.method == TopkMethod::NoauxTc;
    let fits = w.rows == experts
        && router.n_group > 0
        && experts % router.n_group == 0
        && top_k <= experts
        && (!noaux || router.correction_bias.is_some_and(|b| b.len() == experts));
    if !fits {
        return Err(Error::Device(format!(
            "a gate of {} experts (weight {}×{}) in {} groups, top {top_k}, without the \
             correction bias it needs",
            experts, w.rows, w.cols, router.n_group
        )));
    }
    Ok(experts <= ROUTE_MAX_EXPERTS && router.n_group <= ROUTE_MAX_GROUPS)
}

/// The routes of `n` rows from `gate_route`'s output: `top_k` weights a row, then `top_k`
/// experts a row.
pub(super) fn routes_of(host: &[f32], n: usize, top_k: usize) -> Vec<Route> {
    let (weights, picked) = host.split_at(n * top_k);
    (weights.chunks_exact(top_k))
        .zip(picked.chunks_exact(top_k))
        .map(|(weights, picked)| Route {
            experts: picked.iter().map(|&e| e as usize).collect(),
            weights: weights.to_vec(),
        })
        .collect()
}
