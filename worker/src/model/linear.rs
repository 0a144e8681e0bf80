//! Linear layers, the SwiGLU MLP, and the loader that reads them from a checkpoint.

use crate::backend::{add_bias, silu_mul, Backend};
use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// A linear layer `y = x·Wᵀ (+ b)`; several checkpoint tensors may be fused row-wise into one.
pub struct Linear<B: Backend> {
    pub weight: B::Matrix,
    pub bias: Option<Vec<f32>>,
    /// Output width (rows of the weight).
    pub out_features: usize,
}

impl<B: Backend> Linear<B> {
    /// Applies the layer to `m` rows of `x`, writing `m × out_features` values into `out`.
    pub fn forward(&self, backend: &B, x: &[f32], m: usize, out: &mut [f32]) {
        backend.linear(x, m, &self.weight, out);
        if let Some(bias) = &self.bias {
            add_bias(&mut out[..m * self.out_features], bias);
        }
    }

    /// Bytes of the weight and bias.
    pub fn bytes(&self, backend: &B) -> usize {
        backend.matrix_bytes(&self.weight) + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// The gated MLP `down(silu(gate(x)) * up(x))`, with gate and up fused into one product.
pub struct Mlp<B: Backend> {
    pub gate_up: Linear<B>,
    pub down: Linear<B>,
    pub width: usize,
}

impl<B: Backend> Mlp<B> {
    /// Loads `{prefix}.{gate,up,down}_proj` of intermediate width `width`.
    pub fn load(
        loader: &Loader<B>,
        prefix: &str,
        hidden: usize,
        width: usize,
        bias: bool,
    ) -> Result<Self> {
        let gate_up = loader.linear(
            &[
                (&format!("{prefix}.gate_proj"), width),
                (&format!("{prefix}.up_proj"), width),
            ],
            hidden,
            bias,
        )?;
        let down = loader.linear(&[(&format!("{prefix}.down_proj"), hidden)], width, bias)?;
        Ok(Self {
            gate_up,
            down,
            width,
        })
    }

    /// Runs the MLP on `m` rows of `x`, writing `m × hidden` values into `out`.
    pub fn forward(&self, backend: &B, x: &[f32], m: usize, out: &mut [f32]) {
        let mut gate_up = vec![0.0; m * 2 * self.width];
        self.gate_up.forward(backend, x, m, &mut gate_up);
        let mut act = vec![0.0; m * self.width];
        silu_mul(&gate_up, self.width, &mut act);
        self.down.forward(backend, &act, m, out);
    }

    pub fn bytes(&self, backend: &B) -> usize {
        self.gate_up.bytes(backend) + self.down.bytes(backend)
    }
}

/// Reads tensors from a checkpoint and uploads them to a backend.
pub struct Loader<'a, B: Backend> {
    pub checkpoint: &'a Checkpoint,
    pub backend: &'a B,
}

impl<B: Backend> Loader<'_, B> {
    /// A 1-D tensor of `len` values.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.checkpoint.load_f32(name, &[len])
    }

    /// A 2-D tensor `[rows, cols]` kept on the host.
    pub fn host_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        self.checkpoint.load_f32(name, &[rows, cols])
    }

    /// The layers `parts` (`(prefix, rows)`, each reading `{prefix}.weight`) stacked row-wise
    /// into one linear layer of input width `cols`; biases `{prefix}.bias` when `bias`.
    pub fn linear(&self, parts: &[(&str, usize)], cols: usize, bias: bool) -> Result<Linear<B>> {
        let rows: usize = parts.iter().map(|(_, r)| r).sum();
        // Weights stored as bf16 stay bf16 in the backend (half the bytes a decode step reads);
        // every other dtype becomes f32.
        let mut bf16 = Some(Vec::with_capacity(rows * cols));
        for (prefix, part_rows) in parts {
            let name = format!("{prefix}.weight");
            match (
                self.checkpoint.load_bf16_bits(&name, &[*part_rows, cols])?,
                bf16.as_mut(),
            ) {
                (Some(bits), Some(all)) => all.extend(bits),
                _ => {
                    bf16 = None;
                    break;
                }
            }
        }
        let weight = match bf16 {
            Some(bits) => self.backend.matrix_bf16(rows, cols, bits),
            None => {
                let mut data = Vec::with_capacity(rows * cols);
                for (prefix, part_rows) in parts {
                    let name = format!("{prefix}.weight");
                    data.extend(self.checkpoint.load_f32(&name, &[*part_rows, cols])?);
                }
                self.backend.matrix(rows, cols, data)
            }
        };
        let mut biases = Vec::new();
        if bias {
            for (prefix, part_rows) in parts {
                biases.extend(
                    self.checkpoint
                        .load_f32(&format!("{prefix}.bias"), &[*part_rows])?,
                );
            }
        }
        Ok(Linear {
            weight,
            bias: bias.then_some(biases),
            out_features: rows,
        })
    }
}
