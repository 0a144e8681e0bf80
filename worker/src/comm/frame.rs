//! The tcp backend's wire format.
//!
//! Connection set-up: the dialer (the higher rank) sends a [`Hello`] — magic, the epoch it
//! forms, its rank, the world size and its worker id — and the acceptor answers with a reply
//! that names its own epoch, rank and world and a [`Verdict`]. With a cluster secret the hello
//! has its own magic and is followed by the proofs of [`auth`](super::auth): the dialer's nonce
//! after the hello, a [`Verdict::Challenge`] reply with the acceptor's nonce, the dialer's tag,
//! and the acceptor's tag after its final reply; every payload is then sealed (its length
//! counts the seal's tag). After that, each direction
//! carries frames: a 12-byte header (payload length as u64 LE, the collective's sequence number
//! as u32 LE) and the payload. The sequence number lets a receiver notice ranks that called the
//! collectives in different orders. Sequence number [`ABORT_SEQ`] is reserved for the last frame
//! a failing rank sends: an [abort](encode_abort) that names the ranks it blames.

use std::fmt;
use std::io::{self, Read, Write};

/// Magic and protocol version at the start of every hello; a change of the frame format bumps
/// the last byte.
pub(super) const MAGIC: [u8; 8] = *b"MOEBEP\x00\x02";
/// The magic of a hello that proves the cluster secret.
pub(super) const MAGIC_AUTH: [u8; 8] = *b"MOEBEP\x01\x02";
/// A hello up to its worker id: magic, epoch (u64), rank (u32), world (u32), id length (u8).
pub(super) const HELLO_FIXED: usize = 25;
pub(super) const REPLY_LEN: usize = 28;
const HEADER_LEN: usize = 12;

/// The sequence number of an abort frame; collectives never use it.
pub(super) const ABORT_SEQ: u32 = u32::MAX;

/// The sequence number of the collective after `seq`, skipping [`ABORT_SEQ`].
pub(super) fn next_seq(seq: u32) -> u32 {
    if seq.wrapping_add(1) == ABORT_SEQ {
        0
    } else {
        seq.wrapping_add(1)
    }
}

/// The largest payload a frame may carry. A header claiming more is corrupt (or not ours); the
/// reader fails instead of allocating what it says.
pub(super) const MAX_FRAME_LEN: u64 = 4 << 30;

/// Payloads up to this size are copied behind their header and written with one syscall, so
/// that a small frame is one TCP segment (TCP_NODELAY is on).
const COALESCE_LEN: usize = 64 << 10;

/// Who dials: the first bytes on every data-plane connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hello {
    pub epoch: u64,
    pub rank: u32,
    pub world: u32,
    /// The dialer's worker id (at most 255 bytes of UTF-8), checked against the epoch's record.
    pub id: String,
    /// Whether the dialer proves the cluster secret after this hello.
    pub auth: bool,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let id = &self.id.as_bytes()[..self.id.len().min(u8::MAX as usize)];
        let mut b = Vec::with_capacity(HELLO_FIXED + id.len());
        b.extend_from_slice(if self.auth { &MAGIC_AUTH } else { &MAGIC });
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.rank.to_le_bytes());
        b.extend_from_slice(&self.world.to_le_bytes());
        b.push(id.len() as u8);
        b.extend_from_slice(id);
        b
    }

    /// The fixed part of a hello: `(epoch, rank, world, id length, auth)`, or `None` if it
    /// does not start with one of our magics.
    pub fn decode_fixed(b: &[u8; HELLO_FIXED]) -> Option<(u64, u32, u32, usize, bool)> {
        let auth = match &b[..8] {
            m if m == MAGIC => false,
            m if m == MAGIC_AUTH => true,
            _ => return None,
        };
        let epoch = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let rank = u32::from_le_bytes(b[16..20].try_into().ok()?);
        let world = u32::from_le_bytes(b[20..24].try_into().ok()?);
        Some((epoch, rank, world, b[24] as usize, auth))
    }
}

/// The acceptor's answer to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Accepted,
    /// The acceptor has moved past the hello's epoch; the dialer waits for a newer record.
    Stale,
    /// The hello does not fit the epoch (wrong world size, rank or worker id).
    Rejected,
    /// The two ends do not share a cluster secret (one has none, or they differ).
    Unauthenticated,
    /// Not a verdict yet: the acceptor's nonce follows; prove the secret over it.
    Challenge,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Accepted => 0,
            Verdict::Stale => 1,
            Verdict::Rejected => 2,
            Verdict::Unauthenticated => 3,
            Verdict::Challenge => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Verdict::Accepted,
            1 => Verdict::Stale,
            2 => Verdict::Rejected,
            3 => Verdict::Unauthenticated,
            4 => Verdict::Challenge,
            _ => return None,
        })
    }
}

/// The acceptor's reply: its epoch, rank and world, and the verdict on the hello.
pub(super) fn encode_reply(epoch: u64, rank: u32, world: u32, verdict: Verdict) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&epoch.to_le_bytes());
    b[16..20].copy_from_slice(&rank.to_le_bytes());
    b[20..24].copy_from_slice(&world.to_le_bytes());
    b[24..28].copy_from_slice(&verdict.code().to_le_bytes());
    b
}

/// `(epoch, rank, world, verdict)` of a reply, or `None` if it is not one of ours.
pub(super) fn decode_reply(b: &[u8; REPLY_LEN]) -> Option<(u64, u32, u32, Verdict)> {
    if b[..8] != MAGIC {
        return None;
    }
    let epoch = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let rank = u32::from_le_bytes(b[16..20].try_into().ok()?);
    let world = u32::from_le_bytes(b[20..24].try_into().ok()?);
    let code = u32::from_le_bytes(b[24..28].try_into().ok()?);
    Some((epoch, rank, world, Verdict::from_code(code)?))
}

/// The payload of an abort frame: the ranks the failing rank blames, and why.
pub(super) fn encode_abort(culprits: &[usize], message: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 4 * culprits.len() + message.len());
    b.extend_from_slice(&(culprits.len() as u32).to_le_bytes());
    for &c in culprits {
        b.extend_from_slice(&(c as u32).to_le_bytes());
    }
    b.extend_from_slice(message.as_bytes());
    b
}

/// `(culprits, message)` of an abort payload; `None` when it is malformed.
pub(super) fn decode_abort(b: &[u8]) -> Option<(Vec<usize>, String)> {
    let count = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let ranks = b.get(4..4 + count.checked_mul(4)?)?;
    let culprits = ranks
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let message = String::from_utf8_lossy(&b[4 + 4 * count..]).into_owned();
    Some((culprits, message))
}

/// Writes one frame. The caller has checked `payload.len() <= MAX_FRAME_LEN`.
pub(super) fn write_frame(w: &mut impl Write, seq: u32, payload: &[u8]) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[8..].copy_from_slice(&seq.to_le_bytes());
    if payload.len() <= COALESCE_LEN {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        w.write_all(&buf)
    } else {
        w.write_all(&header)?;
        w.write_all(payload)
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(super) enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// The peer closed the connection in the middle of a frame (of its header or payload).
    Truncated {
        expected: u64,
        got: u64,
    },
    /// The header claims a payload over [`MAX_FRAME_LEN`].
    TooLarge(u64),
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Closed => write!(f, "closed the connection"),
            FrameError::Truncated { expected, got } => write!(
                f,
                "closed the connection in the middle of a frame (got {got} of {expected} bytes)"
            ),
            FrameError::TooLarge(len) => write!(
                f,
                "sent a frame header claiming {len} bytes, over the 4 GiB limit \
                 (corrupt stream, or not a Moebius peer)"
            ),
            FrameError::Io(e) => write!(f, "connection failed ({e})"),
        }
    }
}

/// Runs `bytes` through every decoder of the wire format, as they come off a connection: a
/// hello, a reply, an abort payload, and a stream of frames until it ends or fails. For the
/// fuzz targets; none of these may panic or allocate far beyond the bytes that arrive.
pub(super) fn decode_untrusted(bytes: &[u8]) {
    if let Some(fixed) = bytes.get(..HELLO_FIXED) {
        let fixed: &[u8; HELLO_FIXED] = fixed.try_into().expect("HELLO_FIXED bytes");
        if let Some((_, _, _, id_len, _)) = Hello::decode_fixed(fixed) {
            let _ = bytes
                .get(HELLO_FIXED..HELLO_FIXED + id_len)
                .map(|id| String::from_utf8_lossy(id).into_owned());
        }
    }
    if let Some(reply) = bytes.get(..REPLY_LEN) {
        let _ = decode_reply(reply.try_into().expect("REPLY_LEN bytes"));
    }
    let _ = decode_abort(bytes);
    let mut stream = bytes;
    while let Ok((seq, payload)) = read_frame_into(&mut stream, |_| None) {
        if seq == ABORT_SEQ {
            let _ = decode_abort(&payload);
        }
    }
}

/// Reads one frame: `(seq, payload)`. Memory grows with the bytes that actually arrive, not with
/// what the header claims.
#[cfg(test)]
pub(super) fn read_frame(r: &mut impl Read) -> Result<(u32, Vec<u8>), FrameError> {
    read_frame_into(r, |_| None)
}

/// [`read_frame`], receiving into a buffer from `reuse(len)` when it offers one (its contents are
/// discarded). The header is trusted for at most 64 MiB beyond the capacity the buffer already
/// has; past that, memory grows with the bytes that actually arrive.
pub(super) fn read_frame_into(
    r: &mut impl Read,
    reuse: impl FnOnce(u64) -> Option<Vec<u8>>,
) -> Result<(u32, Vec<u8>), FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    expected: HEADER_LEN as u64,
                    got: filled as u64,
                })
            }
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[..8]);
    let len = u64::from_le_bytes(len_bytes);
    let seq = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    const TRUSTED: u64 = 64 << 20;
    let mut payload = match reuse(len) {
        Some(mut buf) => {
            buf.clear();
            let have = buf.capacity() as u64;
            if have < len {
                buf.reserve_exact(len.min(have + TRUSTED) as usize);
            }
            buf
        }
        None => Vec::with_capacity(len.min(TRUSTED) as usize),
    };
    let got = r
        .take(len)
        .read_to_end(&mut payload)
        .map_err(FrameError::Io)? as u64;
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok((seq, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        let big = vec![5u8; COALESCE_LEN + 1];
        write_frame(&mut wire, 7, b"").expect("write");
        write_frame(&mut wire, 8, b"abc").expect("write");
        write_frame(&mut wire, 9, &big).expect("write");
        let mut r = wire.as_slice();
        assert_eq!(read_frame(&mut r).expect("empty"), (7, Vec::new()));
        assert_eq!(read_frame(&mut r).expect("small"), (8, b"abc".to_vec()));
        assert_eq!(read_frame(&mut r).expect("big"), (9, big));
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn absurd_or_truncated_frames_are_errors() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&u64::MAX.to_le_bytes());
        wire.extend_from_slice(&0u32.to_le_bytes());
        let err = read_frame(&mut wire.as_slice()).expect_err("absurd length");
        assert!(matches!(err, FrameError::TooLarge(u64::MAX)));
        assert!(err.to_string().contains("4 GiB"));

        let mut wire = Vec::new();
        write_frame(&mut wire, 1, b"hello").expect("write");
        wire.truncate(wire.len() - 2);
        let err = read_frame(&mut wire.as_slice()).expect_err("truncated");
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 5,
                got: 3
            }
        ));
        let err = read_frame(&mut &wire[..5]).expect_err("truncated header");
        assert!(matches!(err, FrameError::Truncated { .. }));
    }

    #[test]
    fn hello_reply_and_abort_round_trip() {
        let hello = Hello {
            epoch: 9,
            rank: 3,
            world: 8,
            id: "w3".into(),
            auth: false,
        };
        let bytes = hello.encode();
        let fixed: [u8; HELLO_FIXED] = bytes[..HELLO_FIXED].try_into().expect("fixed part");
        assert_eq!(Hello::decode_fixed(&fixed), Some((9, 3, 8, 2, false)));
        let authed = Hello {
            auth: true,
            ..hello.clone()
        }
        .encode();
        let fixed_auth: [u8; HELLO_FIXED] = authed[..HELLO_FIXED].try_into().expect("fixed");
        assert_eq!(Hello::decode_fixed(&fixed_auth), Some((9, 3, 8, 2, true)));
        assert_eq!(&bytes[HELLO_FIXED..], b"w3");
        let mut bad = fixed;
        bad[0] = b'X';
        assert_eq!(Hello::decode_fixed(&bad), None);
        for verdict in [
            Verdict::Accepted,
            Verdict::Stale,
            Verdict::Rejected,
            Verdict::Unauthenticated,
            Verdict::Challenge,
        ] {
            let reply = encode_reply(9, 1, 4, verdict);
            assert_eq!(decode_reply(&reply), Some((9, 1, 4, verdict)));
        }
        let abort = encode_abort(&[2, 5], "rank 2 closed");
        assert_eq!(
            decode_abort(&abort),
            Some((vec![2, 5], "rank 2 closed".into()))
        );
        assert_eq!(
            decode_abort(&[9, 0, 0, 0, 1]),
            None,
            "claims 9 ranks, has none"
        );
        assert_eq!(next_seq(ABORT_SEQ - 1), 0);
        assert_eq!(next_seq(7), 8);
    }
}
