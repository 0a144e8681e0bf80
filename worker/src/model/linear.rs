//! Linear layers, the SwiGLU MLP, and the loader that reads them from a checkpoint.

use crate::backend::{add_bias, bf16_to_f32, silu_mul, Backend, MlpRun};
use crate::checkpoint::{Checkpoint, Fp8Blocks};
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
        if self.has_bias() {
            return self.forward_with_bias(backend, x, m, out);
        }
        backend.mlp_grouped(&mut [MlpRun {
            x,
            m,
            gate_up: &self.gate_up.weight,
            down: &self.down.weight,
            out,
        }]);
    }

    fn has_bias(&self) -> bool {
        self.gate_up.bias.is_some() || self.down.bias.is_some()
    }

    /// The MLP product by product, adding the biases.
    fn forward_with_bias(&self, backend: &B, x: &[f32], m: usize, out: &mut [f32]) {
        let mut gate_up = vec![0.0; m * 2 * self.width];
        self.gate_up.forward(backend, x, m, &mut gate_up);
        let mut act = vec![0.0; m * self.width];
        silu_mul(&gate_up, self.width, &mut act);
        self.down.forward(backend, &act, m, out);
    }

    /// Runs each MLP of `runs` on its own `m` rows of `x`, as one [`Backend::mlp_grouped`]:
    /// a MoE layer's experts with one fork (CPU) or one round trip (GPU) for all of them;
    /// returns each run's `m × hidden` values.
    pub fn forward_grouped(backend: &B, runs: &[(&Self, &[f32], usize)]) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = runs
            .iter()
            .map(|&(mlp, _, m)| vec![0.0; m * mlp.down.out_features])
            .collect();
        if runs.iter().any(|(mlp, _, _)| mlp.has_bias()) {
            for (&(mlp, x, m), out) in runs.iter().zip(&mut outs) {
                mlp.forward_with_bias(backend, x, m, out);
            }
            return outs;
        }
        let mut group: Vec<MlpRun<'_, B::Matrix>> = runs
            .iter()
            .zip(&mut outs)
            .map(|(&(mlp, x, m), out)| MlpRun {
                x,
                m,
                gate_up: &mlp.gate_up.weight,
                down: &mlp.down.weight,
                out,
            })
            .collect();
        backend.mlp_grouped(&mut group);
        outs
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

    /// The weight `name` (`[rows, cols]`) as stored: bf16 bits, FP8 codes with their block
    /// scales, or f32 for every other dtype.
    pub fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let shape = [rows, cols];
        if let Some(bits) = self.checkpoint.load_bf16_bits(name, &shape)? {
            return Ok(Weight::Bf16(bits));
        }
        if let Some(blocks) = self.checkpoint.load_fp8(name, &shape)? {
            return Ok(Weight::Fp8(blocks));
        }
        Ok(Weight::F32(self.checkpoint.load_f32(name, &shape)?))
    }

    /// The layers `parts` (`(prefix, rows)`, each reading `{prefix}.weight`) stacked row-wise
    /// into one linear layer of input width `cols`; biases `{prefix}.bias` when `bias`.
    pub fn linear(&self, parts: &[(&str, usize)], cols: usize, bias: bool) -> Result<Linear<B>> {
        let rows: usize = parts.iter().map(|(_, r)| r).sum();
        let mut stacked: Option<Weight> = None;
        for (prefix, part_rows) in parts {
            let part = self.weight(&format!("{prefix}.weight"), *part_rows, cols)?;
            stacked = Some(match stacked {
                None => part,
                Some(above) => above.stack(part),
            });
        }
        let weight = stacked
            .unwrap_or(Weight::F32(Vec::new()))
            .matrix(self.backend, rows, cols);
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

/// A weight as the checkpoint stores it. Weights stored as bf16 stay bf16 in the backend (half
/// the bytes a decode step reads), FP8 weights stay FP8 with their block scales where the
/// backend keeps them so ([`Backend::matrix_fp8`]); every other dtype becomes f32.
pub enum Weight {
    Bf16(Vec<u16>),
    Fp8(Fp8Blocks),
    F32(Vec<f32>),
}

impl Weight {
    /// This weight with `below`'s rows under it: in the dtype both share where they can be
    /// stacked so, else in f32.
    fn stack(self, below: Weight) -> Weight {
        match (self, below) {
            (Weight::Bf16(mut a), Weight::Bf16(b)) => {
                a.extend(b);
                Weight::Bf16(a)
            }
            (Weight::Fp8(mut a), Weight::Fp8(b)) => match a.stack(b) {
                Ok(()) => Weight::Fp8(a),
                Err(b) => Weight::F32(Weight::Fp8(a).into_f32()).stack(Weight::Fp8(b)),
            },
            (above, below) => {
                let mut all = above.into_f32();
                all.extend(below.into_f32());
                Weight::F32(all)
            }
        }
    }

    fn into_f32(self) -> Vec<f32> {
        match self {
            Weight::Bf16(bits) => bits.into_iter().map(bf16_to_f32).collect(),
            Weight::Fp8(blocks) => blocks.dequantize(),
            Weight::F32(values) => values,
        }
    }

    /// The whole weight as a backend matrix `[rows, cols]`.
    pub fn matrix<B: Backend>(self, backend: &B, rows: usize, cols: usize) -> B::Matrix {
        match self {
            Weight::Bf16(bits) => backend.matrix_bf16(rows, cols, bits),
            Weight::Fp8(blocks) => backend.matrix_fp8(blocks),
            Weight::F32(values) => backend.matrix(rows, cols, values),
        }
    }

    /// A backend matrix `[rows, cols]` whose value at `(r, c)` is this weight's value at flat
    /// index `at(r, c)`: a slice, a transpose, or both.
    pub fn gather<B: Backend>(
        &self,
        backend: &B,
        rows: usize,
        cols: usize,
        at: impl Fn(usize, usize) -> usize,
    ) -> B::Matrix {
        fn pick<T: Copy>(
            v: &[T],
            rows: usize,
            cols: usize,
            at: impl Fn(usize, usize) -> usize,
        ) -> Vec<T> {
            (0..rows)
                .flat_map(|r| (0..cols).map(move |c| (r, c)))
                .map(|(r, c)| v[at(r, c)])
                .collect()
        }
        match self {
            Weight::Bf16(bits) => backend.matrix_bf16(rows, cols, pick(bits, rows, cols, at)),
            // A gathered block no longer lines up with its scales.
            Weight::Fp8(blocks) => {
                backend.matrix(rows, cols, pick(&blocks.dequantize(), rows, cols, at))
            }
            Weight::F32(values) => backend.matrix(rows, cols, pick(values, rows, cols, at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows × 2` codes from `first` on, in blocks of 2 × 2 with a factor of 2 each.
    fn fp8(rows: usize, first: u8) -> Fp8Blocks {
        Fp8Blocks {
            rows,
            cols: 2,
            codes: (0..rows * 2).map(|i| first + i as u8).collect(),
            scales: vec![2.0; rows.div_ceil(2)],
            block: (2, 2),
        }
    }

    fn values(w: Weight) -> (&'static str, Vec<f32>) {
        match w {
            Weight::Bf16(_) => ("bf16", w.into_f32()),
            Weight::Fp8(_) => ("fp8", w.into_f32()),
            Weight::F32(_) => ("f32", w.into_f32()),
        }
    }

    #[test]
    fn stacked_parts_keep_their_stored_dtype_where_they_can() {
        let apart = |a: &Fp8Blocks, b: &Fp8Blocks| [a.dequantize(), b.dequantize()].concat();
        // FP8 under a whole band of blocks stays FP8.
        let (top, below) = (fp8(2, 0x30), fp8(3, 0x40));
        let want = apart(&top, &below);
        let stacked = Weight::Fp8(top).stack(Weight::Fp8(below));
        assert_eq!(values(stacked), ("fp8", want));
        // Under a partial band it becomes f32, with the same values.
        let (top, below) = (fp8(3, 0x30), fp8(2, 0x40));
        let want = apart(&top, &below);
        let stacked = Weight::Fp8(top).stack(Weight::Fp8(below));
        assert_eq!(values(stacked), ("f32", want));
        // bf16 stays bf16; bf16 over FP8 becomes f32.
        let bf16 = |v: f32| Weight::Bf16(vec![half::bf16::from_f32(v).to_bits(); 2]);
        assert_eq!(
            values(bf16(1.5).stack(bf16(-2.0))),
            ("bf16", vec![1.5, 1.5, -2.0, -2.0])
        );
        let below = fp8(1, 0x38);
        let want = [vec![1.5, 1.5], below.dequantize()].concat();
        assert_eq!(values(bf16(1.5).stack(Weight::Fp8(below))), ("f32", want));
    }
}
