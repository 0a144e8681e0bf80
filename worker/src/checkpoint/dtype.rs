//! Element conversions from the little-endian bytes of a safetensors tensor to `f32`.
//!
//! The input is a byte slice straight out of the memory map, so nothing here assumes alignment:
//! every element is rebuilt from its bytes. The loops are plain `chunks_exact` walks that the
//! compiler vectorises. FP8 codes are decoded through [`FP8_E4M3FN`], a 256-entry table built at
//! compile time (the block scaling lives in `fp8`).

/// `f32` from little-endian IEEE single precision bytes. A trailing partial element (which the
/// header validation rules out) is ignored.
pub(crate) fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `f32` from little-endian bfloat16 bytes (exact: bf16 is the top half of an f32).
pub(crate) fn bf16_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// `f32` from little-endian IEEE half precision bytes (exact).
pub(crate) fn f16_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// The value of every FP8 E4M3FN code, indexed by the code.
pub(crate) static FP8_E4M3FN: [f32; 256] = fp8_e4m3fn_table();

const fn fp8_e4m3fn_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = fp8_e4m3fn_to_f32(code as u8);
        code += 1;
    }
    table
}

/// Decodes one E4M3FN code: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. There are no
/// infinities; `S.1111.111` (0x7f, 0xff) is NaN, so the largest finite value is
/// `S.1111.110` = ±448. Exponent 0 holds the subnormals `m · 2⁻⁹`.
///
/// Built from bits rather than float arithmetic so that it is exact and usable in a `const`.
const fn fp8_e4m3fn_to_f32(code: u8) -> f32 {
    let sign = ((code as u32) >> 7) << 31;
    let exponent = ((code >> 3) & 0x0f) as u32;
    let mantissa = (code & 0x07) as u32;
    if exponent == 0x0f && mantissa == 0x07 {
        return f32::from_bits(sign | 0x7fc0_0000);
    }
    if exponent == 0 {
        if mantissa == 0 {
            return f32::from_bits(sign);
        }
        // Subnormal 0.mmm · 2⁻⁶: shift the mantissa up to an implicit leading one.
        let mut m = mantissa;
        let mut e: i32 = -6;
        while m & 0x08 == 0 {
            m <<= 1;
            e -= 1;
        }
        let biased = (e + 127) as u32;
        return f32::from_bits(sign | (biased << 23) | ((m & 0x07) << 20));
    }
    // Normal 1.mmm · 2^(e-7): rebias the exponent from 7 to 127.
    f32::from_bits(sign | ((exponent + 120) << 23) | (mantissa << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The E4M3FN value of `code` by the textbook formula, in float arithmetic.
    fn reference(code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((code >> 3) & 0x0f);
        let m = f32::from(code & 0x07);
        if e == 0x0f && m == 7.0 {
            return f32::NAN;
        }
        if e == 0 {
            sign * m / 8.0 * 2f32.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
        }
    }

    #[test]
    fn fp8_table_matches_the_formula_for_every_code() {
        for code in 0..=255u8 {
            let (got, want) = (FP8_E4M3FN[usize::from(code)], reference(code));
            if want.is_nan() {
                assert!(got.is_nan(), "code {code:#04x}: {got}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {code:#04x}");
            }
        }
    }

    #[test]
    fn fp8_known_codes() {
        let codes = [0x00, 0x80, 0x38, 0x40, 0xc0, 0x7e, 0xfe, 0x01, 0x07, 0x08];
        let want = [
            0.0,
            -0.0,
            1.0,
            2.0,
            -2.0,
            448.0,
            -448.0,
            2f32.powi(-9),
            7.0 * 2f32.powi(-9),
            2f32.powi(-6),
        ];
        for (code, w) in codes.into_iter().zip(want) {
            assert_eq!(FP8_E4M3FN[code].to_bits(), w.to_bits(), "code {code:#04x}");
        }
        assert!(FP8_E4M3FN[0x7f].is_nan() && FP8_E4M3FN[0xff].is_nan());
        assert!(FP8_E4M3FN.iter().all(|v| !v.is_infinite()));
    }

    #[test]
    fn unaligned_input_converts() {
        let mut bytes = vec![0u8];
        for v in [1.5f32, -2.25, 3.0e-3] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(f32_from_le(&bytes[1..]), [1.5, -2.25, 3.0e-3]);
        // bf16 0x3fc0 = 1.5, f16 0x3e00 = 1.5; one leading pad byte to misalign.
        assert_eq!(bf16_from_le(&[0, 0xc0, 0x3f][1..]), [1.5]);
        assert_eq!(f16_from_le(&[0, 0x00, 0x3e][1..]), [1.5]);
    }
}
