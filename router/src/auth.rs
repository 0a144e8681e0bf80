//! API keys on the public API: `--api-key-file` holds the keys a client may send as
//! `authorization: Bearer <key>` (gRPC metadata or the HTTP header). A key is compared by its
//! SHA-256 digest in constant time against every configured key, so neither the time of a
//! refusal nor its message tells how close a guess came. Health checks stay open.

use std::path::Path;

use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;

use crate::error::RouterError;

/// The shortest key accepted: guessing must stay hopeless.
const MIN_KEY_LEN: usize = 16;

/// The keys that unlock the public API.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// Why a call was refused: the message the client gets with `UNAUTHENTICATED` or 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    Wrong,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "no API key: send the header `authorization: Bearer <key>` (this router has --api-key-file)"
            }
            Refusal::Malformed => "the authorization header must be `Bearer <key>`",
            Refusal::Wrong => "the API key is not valid",
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl ApiKeys {
    /// The keys of `text`: one per line; blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut digests = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            if key.len() < MIN_KEY_LEN || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "line {}: a key must be at least {MIN_KEY_LEN} characters without spaces",
                    n + 1
                ));
            }
            digests.push(sha256(key.as_bytes()));
        }
        if digests.is_empty() {
            return Err("holds no key (one key per line; # starts a comment)".into());
        }
        Ok(Self { digests })
    }

    /// The keys in `path`.
    pub fn from_file(path: &Path) -> Result<Self, RouterError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RouterError::Config(format!(
                "cannot read --api-key-file {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text)
            .map_err(|e| RouterError::Config(format!("--api-key-file {}: {e}", path.display())))
    }

    /// Checks the value of an `authorization` header.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let value = authorization.ok_or(Refusal::Missing)?;
        let value = std::str::from_utf8(value).map_err(|_| Refusal::Malformed)?;
        let (scheme, key) = value.trim().split_once(' ').ok_or(Refusal::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refusal::Malformed);
        }
        let presented = sha256(key.trim().as_bytes());
        // Every key is compared, whichever matches.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |any, d| any | d.ct_eq(&presented));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }

    /// The gRPC check: `UNAUTHENTICATED` with the reason.
    pub fn check_grpc(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
        self.check(metadata.get("authorization").map(|v| v.as_bytes()))
            .map_err(|r| tonic::Status::unauthenticated(r.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_refusals_say_why() {
        let keys = ApiKeys::parse("# ops\n\nsk-aaaaaaaaaaaaaaaa\n  sk-bbbbbbbbbbbbbbbb  \n")
            .expect("two keys");
        assert_eq!(keys.check(Some(b"Bearer sk-aaaaaaaaaaaaaaaa")), Ok(()));
        assert_eq!(keys.check(Some(b"bearer sk-bbbbbbbbbbbbbbbb")), Ok(()));
        assert_eq!(keys.check(None), Err(Refusal::Missing));
        assert_eq!(
            keys.check(Some(b"sk-aaaaaaaaaaaaaaaa")),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            keys.check(Some(b"Basic sk-aaaaaaaaaaaaaaaa")),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            keys.check(Some(b"Bearer sk-aaaaaaaaaaaaaaab")),
            Err(Refusal::Wrong)
        );
        assert_eq!(keys.check(Some(b"Bearer ")), Err(Refusal::Malformed));
        assert_eq!(keys.check(Some(&[0xff, 0xfe])), Err(Refusal::Malformed));
    }

    #[test]
    fn bad_key_files_are_named() {
        assert!(ApiKeys::parse("# nothing\n")
            .unwrap_err()
            .contains("no key"));
        assert!(ApiKeys::parse("short\n").unwrap_err().starts_with("line 1"));
        assert!(ApiKeys::parse("sk-aaaa aaaaaaaaaaaaaa\n")
            .unwrap_err()
            .contains("without spaces"));
    }
}
