//! Certificates as files, for a webhook running outside a cluster (`kips certs create`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::bundle::parse_pem_certs;
use super::{describe, plan};
use crate::tls::{self, PemPair};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVING_CERT: &str = "tls.crt";
pub const SERVING_KEY: &str = "tls.key";

/// What `kips certs create` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateConfig {
    /// Directory to write ca.crt, ca.key, tls.crt and tls.key into.
    pub out: PathBuf,
    /// Extra names of the serving certificate (localhost, 127.0.0.1 and ::1 always).
    pub sans: Vec<String>,
    /// Adds `<service>.<namespace>.svc` and its variants to the names.
    pub service_name: Option<String>,
    pub namespace: Option<String>,
    pub validity: Duration,
    pub ca_validity: Duration,
    /// Make a new CA even if `out` holds one.
    pub new_ca: bool,
}

/// The names of the serving certificate `args` asks for.
fn names(args: &CreateConfig) -> Vec<String> {
    let mut extra = args.sans.clone();
    if let (Some(service), Some(namespace)) = (&args.service_name, &args.namespace) {
        extra.extend(tls::service_names(service, namespace));
    }
    tls::local_names(&extra)
}

pub fn create(args: &CreateConfig) -> Result<()> {
    let now = SystemTime::now();
    let dir = &args.out;
    let (ca, reused) = match existing_ca(dir)? {
        Some(ca) if !args.new_ca => (ca, true),
        _ => {
            let ca = tls::generate_ca(&plan::ca_common_name(now), args.ca_validity)?;
            (ca, false)
        }
    };
    let ca_info = parse_pem_certs(&ca.cert)?.remove(0);
    // Never outlive the CA.
    let ca_left = ca_info.not_after.duration_since(now).unwrap_or_default();
    let serving = tls::issue_serving_cert(&ca, &names(args), args.validity.min(ca_left))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !reused {
        write_file(&dir.join(CA_KEY), &ca.key, 0o600)?;
        write_file(&dir.join(CA_CERT), &ca.cert, 0o644)?;
    }
    write_file(&dir.join(SERVING_KEY), &serving.key, 0o600)?;
    write_file(&dir.join(SERVING_CERT), &serving.cert, 0o644)?;

    let d = |f: &str| dir.join(f).display().to_string();
    println!(
        "{} {} (CA), wrote {} and {}",
        if reused { "kept" } else { "wrote" },
        d(CA_CERT),
        d(SERVING_CERT),
        d(SERVING_KEY)
    );
    print!("{}", status(dir)?);
    println!(
        "\nServe it:     kips webhook --tls-cert {} --tls-key {}",
        d(SERVING_CERT),
        d(SERVING_KEY)
    );
    println!(
        "Register it:  helm template kips charts/kips --show-only templates/mutatingwebhookconfiguration.yaml \\\n                --set webhook.url=https://<this host>:8443/mutate --set-file webhook.caBundle={} | kubectl apply -f -",
        d(CA_CERT)
    );
    Ok(())
}

/// The CA pair in `dir`, when both files are there and fit together.
fn existing_ca(dir: &Path) -> Result<Option<PemPair>> {
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if !cert.exists() || !key.exists() {
        return Ok(None);
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let pair = PemPair {
        cert: read(&cert)?,
        key: read(&key)?,
    };
    let info = parse_pem_certs(&pair.cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .remove(0);
    let usable = info.is_ca && !info.expired(SystemTime::now() + Duration::from_secs(86_400));
    // An unusable CA (or one that belongs to another key) is replaced, not reused.
    let fits = rcgen::KeyPair::from_pem(&pair.key)
        .ok()
        .and_then(|k| rcgen::Issuer::from_ca_cert_pem(&pair.cert, k).ok())
        .is_some();
    Ok((usable && fits).then_some(pair))
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A description of `dir/ca.crt` and `dir/tls.crt`, and whether the one signed the other.
pub fn status(dir: &Path) -> Result<String> {
    let now = SystemTime::now();
    let read = |f: &str| -> Result<_> {
        let path = dir.join(f);
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        parse_pem_certs(&pem).with_context(|| format!("reading {}", path.display()))
    };
    let cas = read(CA_CERT)?;
    let serving = read(SERVING_CERT)?.remove(0);
    let mut out = describe("serving", &serving, now);
    for ca in &cas {
        out += &describe("CA", ca, now);
    }
    if !cas.iter().any(|ca| serving.signed_by(ca)) {
        out += &format!(
            "  WARNING: {} was not signed by a CA in {}\n",
            SERVING_CERT, CA_CERT
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> CreateConfig {
        CreateConfig {
            out: dir.to_path_buf(),
            sans: vec!["kips.test".to_owned()],
            service_name: None,
            namespace: None,
            validity: Duration::from_secs(3600),
            ca_validity: Duration::from_secs(30 * 86_400),
            new_ca: false,
        }
    }

    #[test]
    fn create_writes_a_pair_and_reuses_the_ca_on_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        create(&args(dir.path())).unwrap();
        let ca_before = std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap();
        let cert_before = std::fs::read_to_string(dir.path().join(SERVING_CERT)).unwrap();
        let key_mode = std::fs::metadata(dir.path().join(CA_KEY)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
        let text = status(dir.path()).unwrap();
        assert!(
            text.contains("names=localhost,127.0.0.1,::1,kips.test"),
            "{text}"
        );
        assert!(!text.contains("WARNING"), "{text}");

        create(&args(dir.path())).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap(),
            ca_before
        );
        assert_ne!(
            std::fs::read_to_string(dir.path().join(SERVING_CERT)).unwrap(),
            cert_before
        );
        let pair = tls::CertFiles {
            cert: dir.path().join(SERVING_CERT),
            key: dir.path().join(SERVING_KEY),
        }
        .read()
        .unwrap();
        crate::certs::trust::check_trusted(&ca_before, &pair.cert, "kips.test", SystemTime::now())
            .unwrap();

        let mut fresh = args(dir.path());
        fresh.new_ca = true;
        create(&fresh).unwrap();
        assert_ne!(
            std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap(),
            ca_before
        );
    }
}
