//! Block-wise FP8 dequantisation, as DeepSeek-V3 stores its weights.
//!
//! A 2-D weight `[rows, cols]` of E4M3FN codes comes with an `f32` tensor `<name>_scale_inv` of
//! shape `[ceil(rows / br), ceil(cols / bc)]`, one factor per `br × bc` block (the last block row
//! and column may be partial): `w[i][j] = fp8(w[i][j]) * scale_inv[i / br][j / bc]`.

use super::dtype::FP8_E4M3FN;

/// The shape of the scale tensor for a `[rows, cols]` weight in blocks of `block = (br, bc)`.
/// `None` when a block side is zero.
pub(crate) fn scale_shape(rows: usize, cols: usize, block: (usize, usize)) -> Option<[usize; 2]> {
    let (br, bc) = block;
    if br == 0 || bc == 0 {
        return None;
    }
    Some([rows.div_ceil(br), cols.div_ceil(bc)])
}

/// A block-quantised FP8 weight as the checkpoint stores it, for a backend that keeps it at one
/// byte a value: `w[i][j] = fp8(codes[i][j]) * scales[i / br][j / bc]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Blocks {
    pub rows: usize,
    pub cols: usize,
    /// Row-major E4M3FN codes, `rows × cols`.
    pub codes: Vec<u8>,
    /// Row-major factors, [`scale_shape`] of the weight.
    pub scales: Vec<f32>,
    /// `(br, bc)`: rows and columns of a block.
    pub block: (usize, usize),
}

impl Fp8Blocks {
    /// The weight in f32, as [`super::Checkpoint::load_f32`] reads it.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_blocks(&self.codes, self.rows, self.cols, &self.scales, self.block)
    }

    /// Stacks `below`'s rows under this weight's, when the two share their columns and blocks
    /// and this weight ends on a whole band of blocks (so `below`'s scales start a band of
    /// their own); otherwise gives `below` back.
    pub fn stack(&mut self, below: Fp8Blocks) -> Result<(), Fp8Blocks> {
        let (br, _) = self.block;
        if below.cols != self.cols
            || below.block != self.block
            || br == 0
            || !self.rows.is_multiple_of(br)
        {
            return Err(below);
        }
        self.rows += below.rows;
        self.codes.extend(below.codes);
        self.scales.extend(below.scales);
        Ok(())
    }
}

/// Dequantises the row-major `[rows, cols]` FP8 `codes` with the row-major block `scale`.
///
/// The caller has checked `codes.len() == rows * cols` and that `scale` has the shape
/// [`scale_shape`] gives; if not, the missing elements are left 0 rather than panicking.
pub(crate) fn dequantize_blocks(
    codes: &[u8],
    rows: usize,
    cols: usize,
    scale: &[f32],
    block: (usize, usize),
) -> Vec<f32> {
    let mut out = vec![0.0f32; codes.len()];
    let Some([_, scale_cols]) = scale_shape(rows, cols, block) else {
        return out;
    };
    let (br, bc) = block;
    if cols == 0 || scale_cols == 0 {
        return out;
    }
    let rows_iter = out.chunks_exact_mut(cols).zip(codes.chunks_exact(cols));
    for (i, (out_row, code_row)) in rows_iter.enumerate() {
        // A band of `br` rows shares one row of scales. No overflow: (band + 1) * scale_cols is
        // at most rows * cols, the length of `out`.
        let band = i / br;
        let Some(scale_row) = scale.get(band * scale_cols..(band + 1) * scale_cols) else {
            break;
        };
        let blocks = out_row.chunks_mut(bc).zip(code_row.chunks(bc));
        for ((out_block, code_block), &s) in blocks.zip(scale_row) {
            for (o, &c) in out_block.iter_mut().zip(code_block) {
                *o = FP8_E4M3FN[usize::from(c)] * s;
            }
        }
    }
    out
}

/// Rows of `k` activations quantised as DeepSeek-V3's `act_quant` does for its FP8 products,
/// in blocks of 1 × 128: per block `scale = max |x| / 448` (1 for a block of zeros) and
/// `codes = e4m3fn_nearest(x / scale)`. Returns the codes (`[rows, k]`) and the scales
/// (`[rows, ceil(k / 128)]`): what the GPU's `quantize_fp8_rows` writes, computed on the CPU.
pub fn quantize_activations(x: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len().div_ceil(128));
    for row in x.chunks(k.max(1)) {
        for block in row.chunks(128) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 { amax / 448.0 } else { 1.0 };
            codes.extend(block.iter().map(|&v| e4m3fn_nearest(v / scale)));
            scales.push(scale);
        }
    }
    (codes, scales)
}

/// The value of an E4M3FN code (NaN for `0x7f` and `0xff`).
pub fn e4m3fn_value(code: u8) -> f32 {
    FP8_E4M3FN[usize::from(code)]
}

/// The E4M3FN code nearest to `v`, ties to the even code, saturating at ±448 (the format has
/// no infinities; NaN becomes 448 too): the inverse of [`FP8_E4M3FN`].
pub fn e4m3fn_nearest(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a >= 448.0 || a.is_nan() {
        return sign | 0x7e;
    }
    if a < 0.015625 {
        // Below 2⁻⁶: subnormal codes of 2⁻⁹ each; 8 of them is 2⁻⁶, the first normal code.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exponent = (bits >> 23) - 120; // 2^(e - 127) is 2^(exponent - 7)
    let (mut mantissa, rest) = ((bits >> 20) & 7, bits & 0xf_ffff);
    if rest > 0x8_0000 || (rest == 0x8_0000 && mantissa & 1 == 1) {
        mantissa += 1; // a carry out of the mantissa raises the exponent
    }
    sign | ((exponent << 3) + mantissa).min(0x7e) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest code by search over every finite code, ties to the even one, against the
    /// rounding by bits: values across the whole range, every midpoint between neighbouring
    /// codes, the edges.
    #[test]
    fn e4m3fn_nearest_rounds_to_the_nearest_code_ties_to_even() {
        let search = |v: f32| -> u8 {
            let a = v.abs();
            let mut best = 0u8;
            for code in 1..=0x7eu8 {
                let d = (FP8_E4M3FN[usize::from(code)] - a).abs();
                let d_best = (FP8_E4M3FN[usize::from(best)] - a).abs();
                if d < d_best || (d == d_best && code % 2 == 0) {
                    best = code;
                }
            }
            best | if v.is_sign_negative() { 0x80 } else { 0 }
        };
        let mut values: Vec<f32> = (0..0x7e)
            .map(|c| (FP8_E4M3FN[c] + FP8_E4M3FN[c + 1]) / 2.0)
            .collect();
        values.extend((0..4000).map(|i| (i as f32 * 0.37).sin() * 2f32.powi(i % 24 - 12)));
        values.extend([
            0.0,
            -0.0,
            448.0,
            449.0,
            464.0,
            1e9,
            2f32.powi(-10),
            2f32.powi(-6),
        ]);
        for v in values {
            assert_eq!(e4m3fn_nearest(v), search(v), "{v}");
        }
        assert_eq!(e4m3fn_nearest(f32::NAN) & 0x7f, 0x7e);
    }

    #[test]
    fn activations_quantise_per_row_and_block_of_128() {
        let mut x: Vec<f32> = (0..2 * 200).map(|i| (i as f32 * 0.11).cos()).collect();
        x[200 + 150] = 8.96; // row 1's second block: scale 0.02
        x[128..200].fill(0.0); // row 0's second block: zeros, scale 1
        let (codes, scales) = quantize_activations(&x, 200);
        assert_eq!((codes.len(), scales.len()), (400, 4));
        assert_eq!(scales[1], 1.0);
        assert_eq!(scales[3], 8.96 / 448.0);
        assert_eq!(codes[200 + 150], 0x7e);
        let back = FP8_E4M3FN[usize::from(codes[5])] * scales[0];
        assert!(
            (back - x[5]).abs() <= x[5].abs() / 16.0,
            "{back} against {}",
            x[5]
        );
    }

    #[test]
    fn partial_blocks_use_their_own_scale() {
        // 3 x 5 in blocks of 2 x 2 -> scales [2, 3]; all codes 0x38 (1.0) so out == scale.
        let codes = [0x38u8; 15];
        let scale = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let out = dequantize_blocks(&codes, 3, 5, &scale, (2, 2));
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0,
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn stacking_on_whole_bands_equals_dequantising_apart() {
        let part = |rows: usize, first: u8| Fp8Blocks {
            rows,
            cols: 3,
            codes: (0..rows * 3)
                .map(|i| first.wrapping_add(i as u8) & 0x77)
                .collect(),
            scales: (0..rows.div_ceil(2) * 2).map(|i| 0.5 + i as f32).collect(),
            block: (2, 2),
        };
        let (top, below) = (part(4, 3), part(3, 40));
        let mut stacked = top.clone();
        assert_eq!(stacked.stack(below.clone()), Ok(()));
        let mut apart = top.dequantize();
        apart.extend(below.dequantize());
        assert_eq!(stacked.rows, 7);
        assert_eq!(stacked.dequantize(), apart);
        // A partial band of blocks at the bottom cannot take more rows under it.
        assert_eq!(stacked.stack(part(2, 9)), Err(part(2, 9)));
        // Nor can a weight of other columns or blocks.
        let mut top = part(4, 3);
        let wide = Fp8Blocks {
            cols: 4,
            codes: vec![0x38; 8],
            ..part(2, 0)
        };
        assert_eq!(top.stack(wide.clone()), Err(wide));
        let other = Fp8Blocks {
            block: (1, 2),
            scales: vec![1.0; 4],
            ..part(2, 0)
        };
        assert_eq!(top.stack(other.clone()), Err(other));
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        assert_eq!(scale_shape(3, 4, (0, 2)), None);
        assert_eq!(dequantize_blocks(&[0x38; 4], 2, 2, &[], (0, 1)), [0.0; 4]);
        assert_eq!(
            dequantize_blocks(&[], 0, 7, &[], (128, 128)),
            Vec::<f32>::new()
        );
        assert_eq!(
            dequantize_blocks(&[], 7, 0, &[], (128, 128)),
            Vec::<f32>::new()
        );
        // Too short a scale leaves zeros instead of indexing out of bounds.
        assert_eq!(
            dequantize_blocks(&[0x38; 4], 2, 2, &[3.0], (1, 2)),
            [3.0, 3.0, 0.0, 0.0]
        );
    }
}
