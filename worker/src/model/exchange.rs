//! The wire format of the MoE exchange, written once and read in place.
//!
//! A dispatch message to one rank is `[count: u32][slots: u32 × count][rows: f32 × count ×
//! hidden]`; a combine message is the expert outputs, `f32 × count × hidden`, in the order the
//! rows came. Everything is little-endian. Rows are written straight from the hidden states
//! into the message, and a received message is read where it lies when its rows are aligned
//! for `f32` (they are when the allocator aligns byte buffers to 4, as every common one does),
//! so a row is copied once on its way out and once on its way back.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// Encodes the rows `entries` of `x` (`(slot, row)` each, in order) for one rank.
pub fn encode_dispatch(entries: &[(u32, usize)], x: &[f32], hidden: usize) -> Vec<u8> {
    let count = entries.len();
    let mut buf = Vec::with_capacity(4 + count * 4 + count * hidden * 4);
    buf.extend_from_slice(&(count as u32).to_le_bytes());
    for &(slot, _) in entries {
        buf.extend_from_slice(&slot.to_le_bytes());
    }
    for &(_, row) in entries {
        push_f32s(&mut buf, &x[row * hidden..(row + 1) * hidden]);
    }
    buf
}

/// A received dispatch message: the slot of every row, and the rows.
pub struct Dispatch<'a> {
    pub slots: Vec<u32>,
    rows: Cow<'a, [f32]>,
    hidden: usize,
}

impl<'a> Dispatch<'a> {
    /// Reads the message `bytes` from rank `src`.
    pub fn decode(bytes: &'a [u8], hidden: usize, src: usize) -> Result<Self> {
        let bad = || {
            Error::Comm(format!(
                "rank {src} sent a malformed dispatch message of {} bytes",
                bytes.len()
            ))
        };
        let count = bytes.get(..4).ok_or_else(bad)?;
        let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let slots_end = count
            .checked_mul(4)
            .and_then(|v| v.checked_add(4))
            .ok_or_else(bad)?;
        let rows_len = count
            .checked_mul(hidden)
            .and_then(|v| v.checked_mul(4))
            .ok_or_else(bad)?;
        if bytes.len() != slots_end + rows_len {
            return Err(bad());
        }
        let slots = bytes[4..slots_end]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            slots,
            rows: f32_view(&bytes[slots_end..]),
            hidden,
        })
    }

    /// Row `i` of the message.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.hidden..(i + 1) * self.hidden]
    }
}

/// A combine message of `count` rows of `hidden` values, zeroed, to be filled with [`put_row`].
pub fn reply_buffer(count: usize, hidden: usize) -> Vec<u8> {
    vec![0; count * hidden * 4]
}

/// Writes `values` as row `i` of a combine message.
pub fn put_row(reply: &mut [u8], i: usize, values: &[f32]) {
    let at = i * values.len() * 4;
    let dst = &mut reply[at..at + values.len() * 4];
    if cfg!(target_endian = "little") {
        dst.copy_from_slice(bytemuck::cast_slice(values));
    } else {
        for (d, v) in dst.chunks_exact_mut(4).zip(values) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The f32 values of little-endian `bytes`: a view when they are aligned (on a little-endian
/// machine), otherwise a copy.
pub fn f32_view(bytes: &[u8]) -> Cow<'_, [f32]> {
    let whole = &bytes[..bytes.len() / 4 * 4];
    if cfg!(target_endian = "little") {
        match bytemuck::try_cast_slice(whole) {
            Ok(view) => Cow::Borrowed(view),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(whole)),
        }
    } else {
        Cow::Owned(
            whole
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

/// Appends the little-endian bytes of `values` to `buf`.
fn push_f32s(buf: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        buf.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_round_trips_rows_and_slots() {
        let hidden = 3;
        let x: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect();
        let bytes = encode_dispatch(&[(7, 2), (1, 0)], &x, hidden);
        let d = Dispatch::decode(&bytes, hidden, 0).expect("well formed");
        assert_eq!(d.slots, vec![7, 1]);
        assert_eq!(d.row(0), &[3.0, 3.5, 4.0]);
        assert_eq!(d.row(1), &[0.0, 0.5, 1.0]);
    }

    #[test]
    fn malformed_dispatch_names_the_sender() {
        let bytes = encode_dispatch(&[(0, 0)], &[1.0, 2.0], 2);
        for cut in [0, 3, 7, bytes.len() - 1] {
            let err = Dispatch::decode(&bytes[..cut], 2, 5)
                .err()
                .expect("malformed");
            assert!(err.to_string().contains("rank 5"), "{err}");
        }
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Dispatch::decode(&huge, 2, 5).is_err());
    }

    #[test]
    fn unaligned_bytes_are_read_by_copy() {
        let mut buf = vec![0u8; 1];
        buf.extend_from_slice(bytemuck::cast_slice(&[1.5f32, -2.0]));
        assert_eq!(&*f32_view(&buf[1..]), &[1.5, -2.0]);
        let mut reply = reply_buffer(2, 2);
        put_row(&mut reply, 1, &[4.0, 5.0]);
        assert_eq!(&*f32_view(&reply), &[0.0, 0.0, 4.0, 5.0]);
    }
}
