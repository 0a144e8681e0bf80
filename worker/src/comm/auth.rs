//! Proof of membership on the data plane: before a connection carries a single frame, both
//! ends prove that they hold the cluster's secret, bound to the epoch, ranks and worker ids of
//! the hello and to a fresh nonce from each end.
//!
//! The dialer sends its hello and a nonce; the acceptor answers with a challenge (its own
//! nonce); the dialer sends `HMAC(secret, "dial" ‖ hello ‖ both nonces)`, which the acceptor
//! checks before the connection may even wait in the lobby; the acceptor's final reply carries
//! `HMAC(secret, "accept" ‖ reply ‖ hello ‖ both nonces)`, which the dialer checks before it
//! uses the connection. So a client without the secret cannot join a group, a recorded
//! handshake cannot be replayed (the other end's nonce differs), and a worker of another
//! cluster, or one given another epoch's record, is refused. Every frame that follows is
//! sealed ([`Direction`]): AES-256-GCM under a key for each direction of the connection,
//! derived from the secret and the handshake, so the frames can be neither read nor changed on
//! the path.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};

/// Bytes of each end's nonce.
pub(super) const NONCE_LEN: usize = 32;
/// Bytes of an HMAC-SHA256 tag.
pub(super) const TAG_LEN: usize = 32;
/// The shortest secret accepted: 256 bits, as `openssl rand -hex 32` gives.
const MIN_SECRET: usize = 32;
/// Bytes a seal adds to a frame's payload: AES-256-GCM's tag.
pub(super) const SEAL_LEN: usize = 16;

/// The secret every worker of a cluster shares for the data plane.
#[derive(Clone)]
pub struct ClusterSecret {
    key: hmac::Key,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// What both ends of one handshake prove their secret over.
#[derive(Debug, Clone)]
pub(super) struct Transcript {
    pub hello: Vec<u8>,
    pub dialer: [u8; NONCE_LEN],
    pub acceptor: [u8; NONCE_LEN],
}

impl ClusterSecret {
    /// A secret of at least 32 bytes.
    pub fn new(secret: &[u8]) -> Result<Self> {
        if secret.len() < MIN_SECRET {
            return Err(Error::Config(format!(
                "the cluster secret has {} bytes; give at least {MIN_SECRET} (e.g. `openssl rand -hex 32`)",
                secret.len()
            )));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// The secret in `path`, without trailing whitespace (a final newline is not part of it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read --cluster-secret-file {}: {e}",
                path.display()
            ))
        })?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        Self::new(&bytes[..end])
            .map_err(|e| Error::Config(format!("--cluster-secret-file {}: {e}", path.display())))
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(label);
        for part in parts {
            context.update(&(part.len() as u64).to_le_bytes());
            context.update(part);
        }
        context.sign()
    }

    /// The dialer's proof.
    pub(super) fn dialer_tag(&self, t: &Transcript) -> hmac::Tag {
        self.tag(b"moebius-ep dial v1", &[&t.hello, &t.dialer, &t.acceptor])
    }

    /// The acceptor's proof, over its reply too.
    pub(super) fn acceptor_tag(&self, t: &Transcript, reply: &[u8]) -> hmac::Tag {
        self.tag(
            b"moebius-ep accept v1",
            &[reply, &t.hello, &t.dialer, &t.acceptor],
        )
    }

    /// Whether `tag` is the dialer's proof (compared in constant time).
    pub(super) fn dialer_proved(&self, t: &Transcript, tag: &[u8]) -> bool {
        constant_time_eq(self.dialer_tag(t).as_ref(), tag)
    }

    /// Whether `tag` is the acceptor's proof (compared in constant time).
    pub(super) fn acceptor_proved(&self, t: &Transcript, reply: &[u8], tag: &[u8]) -> bool {
        constant_time_eq(self.acceptor_tag(t, reply).as_ref(), tag)
    }
}

/// One direction of one connection: AES-256-GCM under a key of its own (derived from the
/// secret and the handshake's transcript), the frame's sequence number as associated data, and
/// a counter as nonce, so that a frame cannot be changed, replayed, reordered or moved to
/// another connection without the receiver noticing. A connection carries far fewer than 2^64
/// frames, so a nonce never repeats under a key.
pub(super) struct Direction {
    key: LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Direction {
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Nonce::assume_unique_for_key(nonce)
    }

    /// `payload` of frame `seq`, sealed into `out` (its contents replaced): the ciphertext,
    /// then the tag.
    pub fn seal(&mut self, seq: u32, payload: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        out.reserve(payload.len() + SEAL_LEN);
        out.extend_from_slice(payload);
        let nonce = self.next_nonce();
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(seq.to_le_bytes()), out)
            .map_err(|_| std::io::Error::other("a frame too large to seal"))
    }

    /// Opens the sealed payload of frame `seq` in place; `false` when it was not sealed by the
    /// other end for this place in the stream.
    pub fn open(&mut self, seq: u32, sealed: &mut Vec<u8>) -> bool {
        let nonce = self.next_nonce();
        match self
            .key
            .open_in_place(nonce, Aad::from(seq.to_le_bytes()), sealed)
        {
            Ok(plain) => {
                let len = plain.len();
                sealed.truncate(len);
                true
            }
            Err(_) => false,
        }
    }
}

/// The two directions of one connection, as one end sees them.
#[derive(Debug)]
pub(super) struct Session {
    pub send: Direction,
    pub recv: Direction,
}

impl ClusterSecret {
    /// The keys of the connection whose handshake was `t`, for the end that dialed it
    /// (`dialed`) or accepted it.
    pub(super) fn session(&self, t: &Transcript, dialed: bool) -> Session {
        let key = |label: &[u8]| {
            let bytes = self.tag(label, &[&t.hello, &t.dialer, &t.acceptor]);
            Direction {
                key: LessSafeKey::new(
                    UnboundKey::new(&AES_256_GCM, bytes.as_ref()).expect("a 32-byte key"),
                ),
                counter: 0,
            }
        };
        let to_acceptor = key(b"moebius-ep key dialer->acceptor v1");
        let to_dialer = key(b"moebius-ep key acceptor->dialer v1");
        if dialed {
            Session {
                send: to_acceptor,
                recv: to_dialer,
            }
        } else {
            Session {
                send: to_dialer,
                recv: to_acceptor,
            }
        }
    }
}

/// Whether two tags are equal, in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh nonce from the operating system's generator.
pub(super) fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| std::io::Error::other("the system's random generator failed"))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            hello: b"hello".to_vec(),
            dialer: [1; NONCE_LEN],
            acceptor: [2; NONCE_LEN],
        }
    }

    #[test]
    fn proofs_hold_only_for_the_same_secret_and_transcript() {
        let a = ClusterSecret::new(&[7; 32]).expect("secret");
        let b = ClusterSecret::new(&[8; 32]).expect("secret");
        let t = transcript();
        let tag = a.dialer_tag(&t);
        assert!(a.dialer_proved(&t, tag.as_ref()));
        assert!(!b.dialer_proved(&t, tag.as_ref()));
        // A dialer's tag is no acceptor's tag, and another nonce makes another proof.
        assert!(!a.acceptor_proved(&t, b"", tag.as_ref()));
        let replayed = Transcript {
            acceptor: [3; NONCE_LEN],
            ..t.clone()
        };
        assert!(!a.dialer_proved(&replayed, tag.as_ref()));
        assert!(!a.dialer_proved(&t, &tag.as_ref()[..31]));
    }

    #[test]
    fn sealed_frames_open_only_in_their_place_on_the_other_end() {
        let secret = ClusterSecret::new(&[7; 32]).expect("secret");
        let t = transcript();
        let mut dialer = secret.session(&t, true);
        let mut acceptor = secret.session(&t, false);
        let mut sealed = Vec::new();
        dialer.send.seal(5, b"rows", &mut sealed).expect("seals");
        assert_eq!(sealed.len(), 4 + SEAL_LEN);
        assert_ne!(&sealed[..4], b"rows", "the payload is encrypted");
        let mut copy = sealed.clone();
        assert!(acceptor.recv.open(5, &mut copy));
        assert_eq!(copy, b"rows");
        // The same frame again (a replay), under another sequence number, changed, or read
        // by the sender's own receiving key: refused.
        let mut again = sealed.clone();
        assert!(!acceptor.recv.open(5, &mut again), "a replay");
        let mut fresh = secret.session(&t, false);
        let mut moved = sealed.clone();
        assert!(!fresh.recv.open(6, &mut moved), "another sequence number");
        let mut fresh = secret.session(&t, false);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(!fresh.recv.open(5, &mut flipped), "a changed byte");
        let mut own = sealed.clone();
        assert!(!dialer.recv.open(5, &mut own), "the sender's own direction");
    }

    #[test]
    fn short_secrets_are_refused_and_a_final_newline_is_not_part_of_it() {
        let err = ClusterSecret::new(b"short").expect_err("too short");
        assert!(err.to_string().contains("at least 32"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        let from_file = ClusterSecret::from_file(&path).expect("reads");
        let direct = ClusterSecret::new("ab".repeat(32).as_bytes()).expect("secret");
        let t = transcript();
        assert!(direct.dialer_proved(&t, from_file.dialer_tag(&t).as_ref()));
    }
}
