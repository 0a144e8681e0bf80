//! The TLS flags every part shares (`--tls-cert`, `--tls-key`, `--tls-ca`,
//! `--tls-server-name`), and `moebius certs`: a throwaway CA with one certificate and a
//! data-plane secret, for a cluster on one machine, a test, or a first try.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use moebius_coordinator::tls::{Tls, TlsFiles};

use super::UsageError;

/// TLS of a part: its certificate and key, and the cluster's CA.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This part's certificate chain (PEM): served on its ports and shown to the parts and the
    /// etcd it dials. With it, every connection of this part is TLS, mutual between parts.
    #[arg(long, env = "MOEBIUS_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MOEBIUS_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA (PEM): the parts and etcd this one talks to must have certificates
    /// signed by it.
    #[arg(long, env = "MOEBIUS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// The name to check in other parts' certificates instead of the host dialled (for
    /// certificates issued to one service name rather than to each address).
    #[arg(long, env = "MOEBIUS_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The files the flags name; `None` when no TLS flag is given. Nothing is read yet.
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) if self.tls_server_name.is_some() => Err(UsageError(
                "--tls-server-name needs --tls-cert, --tls-key and --tls-ca".into(),
            )
            .into()),
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                server_name: self.tls_server_name.clone(),
            })),
            _ => Err(UsageError(
                "give --tls-cert, --tls-key and --tls-ca together: TLS between the parts is \
                 mutual, so each part needs its certificate and the CA"
                    .into(),
            )
            .into()),
        }
    }

    /// The files, read and checked; `None` when no TLS flag is given.
    pub fn load(&self) -> Result<Option<Tls>> {
        let Some(files) = self.files()? else {
            return Ok(None);
        };
        Ok(Some(
            Tls::load(&files).map_err(|e| UsageError(e.to_string()))?,
        ))
    }

    /// The flags that give a child process the same TLS.
    pub fn forward(tls: &Tls) -> Vec<String> {
        let files = tls.files();
        let mut args = vec![
            "--tls-cert".to_string(),
            files.cert.display().to_string(),
            "--tls-key".into(),
            files.key.display().to_string(),
            "--tls-ca".into(),
            files.ca.display().to_string(),
        ];
        if let Some(name) = &files.server_name {
            args.extend(["--tls-server-name".into(), name.clone()]);
        }
        args
    }

    /// Whether TLS flags are given (the files are not read).
    pub fn enabled(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    /// `--check-config`: the flags checked, and the files too where they are here (a
    /// deployment mounts them only in the running container).
    pub fn check(&self) -> Result<String> {
        let Some(files) = self.files()? else {
            return Ok("plaintext".into());
        };
        if [&files.cert, &files.key, &files.ca]
            .iter()
            .all(|p| p.exists())
        {
            Tls::load(&files).map_err(|e| UsageError(e.to_string()))?;
            Ok(format!(
                "mutual TLS with CA {} (checked)",
                files.ca.display()
            ))
        } else {
            Ok(format!(
                "mutual TLS with CA {} (files not here; not checked)",
                files.ca.display()
            ))
        }
    }
}

/// Flags of `moebius certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Folder to write into: ca.pem, cert.pem, key.pem and cluster-secret.
    pub dir: PathBuf,
    /// More names or addresses the certificate is valid for, besides localhost, 127.0.0.1 and
    /// ::1 (repeat the flag).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Replace files that are already there.
    #[arg(long)]
    pub force: bool,
}

/// What `moebius certs` writes, by file name.
pub const CA: &str = "ca.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
pub const SECRET: &str = "cluster-secret";

/// The TLS files of a folder that `moebius certs` wrote.
pub fn files_in(dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: dir.join(CERT),
        key: dir.join(KEY),
        ca: dir.join(CA),
        server_name: None,
    }
}

pub fn run(args: CertsArgs) -> Result<()> {
    let written = generate(&args.dir, &args.hosts, args.force)?;
    if written {
        println!(
            "wrote {CA}, {CERT}, {KEY} and {SECRET} into {}",
            args.dir.display()
        );
    } else {
        println!(
            "{} already holds {CA}, {CERT}, {KEY} and {SECRET}; kept them (--force replaces them)",
            args.dir.display()
        );
    }
    Ok(())
}

/// Writes a new CA, a certificate it signs (for servers and clients alike; valid for
/// localhost, 127.0.0.1, ::1 and `hosts`) with its key, and a random data-plane secret into
/// `dir`. Keeps what is there unless `force`; returns whether it wrote.
pub fn generate(dir: &Path, hosts: &[String], force: bool) -> Result<bool> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let paths = [CA, CERT, KEY, SECRET].map(|f| dir.join(f));
    if !force && paths.iter().all(|p| p.exists()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Moebius throwaway CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.extend(hosts.iter().cloned());
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name.push(DnType::CommonName, "moebius");
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca, ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();

    write(&paths[0], ca_cert.pem().as_bytes(), false)?;
    write(&paths[1], leaf_cert.pem().as_bytes(), false)?;
    write(&paths[2], leaf_key.serialize_pem().as_bytes(), true)?;
    write(&paths[3], format!("{secret_hex}\n").as_bytes(), true)?;
    Ok(true)
}

/// Writes `bytes` to `path`, readable by its owner only when `private`.
fn write(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_and_are_kept_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(generate(dir.path(), &["worker-0.moebius".into()], false).expect("writes"));
        Tls::load(&files_in(dir.path())).expect("the files fit together");
        moebius_worker::comm::ClusterSecret::from_file(&dir.path().join(SECRET))
            .expect("the secret is long enough");
        let ca = std::fs::read(dir.path().join(CA)).expect("ca");
        assert!(!generate(dir.path(), &[], false).expect("keeps"));
        assert_eq!(std::fs::read(dir.path().join(CA)).expect("ca"), ca);
        assert!(generate(dir.path(), &[], true).expect("replaces"));
        assert_ne!(std::fs::read(dir.path().join(CA)).expect("ca"), ca);
    }

    #[test]
    fn flags_come_in_threes() {
        let only_cert = TlsArgs {
            tls_cert: Some("c.pem".into()),
            ..TlsArgs::default()
        };
        let err = only_cert.load().expect_err("needs the key and CA");
        assert!(err.to_string().contains("together"), "{err}");
        assert!(TlsArgs::default().load().expect("none").is_none());
    }
}

/// The security flags of `moebius up`, for every part it starts.
#[derive(Args, Debug, Clone, Default)]
pub struct UpSecurityArgs {
    /// Run every connection over TLS with a throwaway CA, certificate and data-plane secret,
    /// written into DIR the first time (as `moebius certs DIR`) and reused after. Clients
    /// trust DIR/ca.pem.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub self_signed_tls: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// File holding the data-plane secret (at least 32 bytes); with --self-signed-tls, the one
    /// in its folder.
    #[arg(long, env = "MOEBIUS_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Run the data plane without the secret although TLS is configured.
    #[arg(
        long,
        env = "MOEBIUS_INSECURE_DATA_PLANE",
        conflicts_with = "cluster_secret_file"
    )]
    pub insecure_data_plane: bool,
    /// File of API keys the router asks for (one per line).
    #[arg(long, env = "MOEBIUS_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

/// What `up` secures its parts with, read and checked.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub tls: Option<Tls>,
    pub secret_file: Option<PathBuf>,
    pub secret: Option<moebius_worker::comm::ClusterSecret>,
    pub insecure_data_plane: bool,
    pub api_key_file: Option<PathBuf>,
    pub api_keys: Option<moebius_router::auth::ApiKeys>,
}

impl UpSecurityArgs {
    /// Generates the throwaway files when asked, then reads and checks everything.
    pub fn resolve(&self) -> Result<Security> {
        let (tls, secret_file) = match &self.self_signed_tls {
            Some(dir) => {
                if generate(dir, &[], false)? {
                    println!(
                        "[up] wrote a throwaway CA, certificate and secret into {}",
                        dir.display()
                    );
                }
                let tls = Tls::load(&files_in(dir)).map_err(|e| UsageError(e.to_string()))?;
                let secret = self
                    .cluster_secret_file
                    .clone()
                    .or_else(|| (!self.insecure_data_plane).then(|| dir.join(SECRET)));
                (Some(tls), secret)
            }
            None => (self.tls.load()?, self.cluster_secret_file.clone()),
        };
        super::worker::check_data_plane(
            tls.is_some(),
            secret_file.is_some(),
            self.insecure_data_plane,
        )?;
        let secret = secret_file
            .as_deref()
            .map(moebius_worker::comm::ClusterSecret::from_file)
            .transpose()?;
        let api_keys = self
            .api_key_file
            .as_deref()
            .map(moebius_router::auth::ApiKeys::from_file)
            .transpose()?;
        Ok(Security {
            tls,
            secret_file,
            secret,
            insecure_data_plane: self.insecure_data_plane,
            api_key_file: self.api_key_file.clone(),
            api_keys,
        })
    }
}

impl Security {
    /// Flags for every part `up --etcd` starts.
    pub fn part_args(&self) -> Vec<String> {
        self.tls.as_ref().map(TlsArgs::forward).unwrap_or_default()
    }

    /// Flags for a worker process.
    pub fn worker_args(&self) -> Vec<String> {
        let mut args = self.part_args();
        if let Some(file) = &self.secret_file {
            args.extend(["--cluster-secret-file".into(), file.display().to_string()]);
        }
        if self.insecure_data_plane {
            args.push("--insecure-data-plane".into());
        }
        args
    }

    /// Flags for the router process.
    pub fn router_args(&self) -> Vec<String> {
        let mut args = self.part_args();
        if let Some(file) = &self.api_key_file {
            args.extend(["--api-key-file".into(), file.display().to_string()]);
        }
        args
    }
}
