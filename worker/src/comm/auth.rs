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
//! cluster, or one given another epoch's record, is refused. The frames that follow travel in
//! the clear: this stops strangers, not an attacker who can rewrite packets on the path.

use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};

/// Bytes of each end's nonce.
pub(super) const NONCE_LEN: usize = 32;
/// Bytes of an HMAC-SHA256 tag.
pub(super) const TAG_LEN: usize = 32;
/// The shortest secret accepted: 256 bits, as `openssl rand -hex 32` gives.
const MIN_SECRET: usize = 32;

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
