//! Certificates as kips reasons about them, and PEM trust bundles (pure: no I/O).

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// `tls::generate_ca` and `tls::issue_serving_cert` backdate `notBefore` by this much (for
/// clocks slightly behind), so a certificate was made at `notBefore + BACKDATE`. If the
/// backdating shrank, kips would only wait longer than needed, never less.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// What kips needs to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub der: Vec<u8>,
    /// The subject's common name (or the whole subject when it has none).
    pub subject: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// DNS names and IP addresses of the subjectAltName extension.
    pub names: Vec<String>,
}

impl CertInfo {
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
        let name = |n: &x509_parser::x509::X509Name<'_>| {
            n.iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map_or_else(|| n.to_string(), str::to_owned)
        };
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => ip_from_bytes(bytes),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            der: der.to_vec(),
            subject: name(cert.subject()),
            issuer: name(cert.issuer()),
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
            is_ca: cert.is_ca(),
            names,
        })
    }

    /// When the certificate was made (see [`BACKDATE`]).
    pub fn issued_at(&self) -> SystemTime {
        self.not_before + BACKDATE
    }

    /// Two thirds into its validity: from then on kips replaces it.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.not_before, self.not_after)
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Whether `issuer`'s key signed this certificate.
    pub fn signed_by(&self, issuer: &CertInfo) -> bool {
        let (Ok((_, cert)), Ok((_, ca))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&issuer.der),
        ) else {
            return false;
        };
        cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    pub fn pem(&self) -> String {
        pem_encode(&self.der)
    }
}

/// Two thirds into the validity window: renewal then leaves a third of the life (30 days of
/// a 90-day certificate) for retries, rollouts and a slow API server.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life * 2 / 3
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

/// Every certificate of a PEM text, in order; an error when there is none or one is broken.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertInfo>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading PEM certificates")?;
    if certs.is_empty() {
        bail!("no PEM certificate found");
    }
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| CertInfo::from_der(der).with_context(|| format!("certificate {}", i + 1)))
        .collect()
}

pub fn pem_encode(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A trust bundle as PEM: each certificate once, in the given order.
pub fn bundle_pem<'a>(certs: impl IntoIterator<Item = &'a CertInfo>) -> String {
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut out = String::new();
    for cert in certs {
        if !seen.contains(&cert.der.as_slice()) {
            seen.push(&cert.der);
            out.push_str(&cert.pem());
        }
    }
    out
}

/// `bundle` with `ca` appended unless it is already there.
pub fn with_ca(bundle: &[CertInfo], ca: &CertInfo) -> Vec<CertInfo> {
    let mut out = bundle.to_vec();
    if !out.iter().any(|c| c.der == ca.der) {
        out.push(ca.clone());
    }
    out
}

/// Whether two PEM texts carry the same certificates in the same order (whatever the line
/// wrapping or surrounding text).
pub fn same_certificates(a: &str, b: &str) -> bool {
    let ders = |pem: &str| -> Option<Vec<Vec<u8>>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.ok().map(|c| c.to_vec()))
            .collect()
    };
    matches!((ders(a), ders(b)), (Some(x), Some(y)) if x == y && !x.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    #[test]
    fn renewal_is_due_two_thirds_into_the_validity() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_at(start, start + 90 * day), start + 60 * day);
        assert_eq!(renew_at(start, start + 3 * day), start + 2 * day);
        // A window that ends before it starts is due at once rather than never.
        assert_eq!(renew_at(start, start - day), start);
    }

    #[test]
    fn certificates_are_read_back_with_names_validity_and_issuer() {
        let ca = tls::generate_ca("kips test CA", Duration::from_secs(3600)).unwrap();
        let names = vec!["kips.kips-system.svc".to_owned(), "127.0.0.1".to_owned()];
        let pair = tls::issue_serving_cert(&ca, &names, Duration::from_secs(600)).unwrap();
        let ca_info = &parse_pem_certs(&ca.cert).unwrap()[0];
        let info = &parse_pem_certs(&pair.cert).unwrap()[0];
        assert!(ca_info.is_ca && !info.is_ca);
        assert_eq!(info.names, names);
        assert_eq!(info.issuer, "kips test CA");
        assert!(info.signed_by(ca_info));
        assert!(!ca_info.signed_by(info));
        let other = tls::generate_ca("kips test CA", Duration::from_secs(3600)).unwrap();
        let other = &parse_pem_certs(&other.cert).unwrap()[0];
        assert!(!info.signed_by(other), "same subject, other key");
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(600) + BACKDATE);
    }

    #[test]
    fn bundles_keep_order_drop_duplicates_and_round_trip() {
        let a = tls::generate_ca("a", Duration::from_secs(3600)).unwrap();
        let b = tls::generate_ca("b", Duration::from_secs(3600)).unwrap();
        let a = parse_pem_certs(&a.cert).unwrap().remove(0);
        let b = parse_pem_certs(&b.cert).unwrap().remove(0);
        let merged = with_ca(&with_ca(std::slice::from_ref(&a), &b), &a);
        assert_eq!(merged, vec![a.clone(), b.clone()]);
        let pem = bundle_pem(&[a.clone(), b.clone(), a.clone()]);
        assert_eq!(parse_pem_certs(&pem).unwrap(), vec![a.clone(), b.clone()]);
        assert!(same_certificates(&pem, &format!("junk\n{pem}")));
        assert!(!same_certificates(&pem, &bundle_pem(&[b, a])));
        assert!(!same_certificates("", ""));
        assert!(parse_pem_certs("no pem here").is_err());
    }
}
