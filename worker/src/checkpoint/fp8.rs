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

#[cfg(test)]
mod tests {
    use super::*;

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
