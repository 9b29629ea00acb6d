//! TLS to the relay: the public roots (webpki-roots, so a minimal image needs no CA bundle)
//! plus any extra CA the operator names (`--relay-ca FILE`, or PEM text in `KIPS_RELAY_CA`,
//! e.g. from an optional key of the relay Secret), so a private or test relay can be used.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Where extra trusted CA certificates come from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraCa {
    pub origin: String,
    pub pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{origin}: no PEM certificate in it")]
    NoCertificate { origin: String },
    #[error("{origin}: {error}")]
    BadCertificate { origin: String, error: String },
}

/// Connects to the relay over TCP and TLS.
#[derive(Clone)]
pub(crate) struct RelayConnector {
    tls: TlsConnector,
    connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve {host}: {error}")]
    Resolve { host: String, error: std::io::Error },
    #[error("cannot connect to {address}: {error}")]
    Connect {
        address: String,
        error: std::io::Error,
    },
    #[error("no answer from {address} within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("TLS with {host}: {error}")]
    Tls { host: String, error: std::io::Error },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
}

impl RelayConnector {
    pub(crate) fn new(extra: &[ExtraCa], connect_timeout: Duration) -> Result<Self, TrustError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for ca in extra {
            let certificates: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(ca.pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|error| TrustError::BadCertificate {
                        origin: ca.origin.clone(),
                        error: error.to_string(),
                    })?;
            if certificates.is_empty() {
                return Err(TrustError::NoCertificate {
                    origin: ca.origin.clone(),
                });
            }
            for certificate in certificates {
                roots
                    .add(certificate)
                    .map_err(|error| TrustError::BadCertificate {
                        origin: ca.origin.clone(),
                        error: error.to_string(),
                    })?;
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(RelayConnector {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
        })
    }

    /// TCP (first address that answers) and TLS to `host:port`, within the connect timeout.
    pub(crate) async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TlsStream<TcpStream>, TransportError> {
        let address = format!("{host}:{port}");
        tokio::time::timeout(self.connect_timeout, self.connect_inner(host, port))
            .await
            .map_err(|_| TransportError::Timeout {
                address,
                timeout: self.connect_timeout,
            })?
    }

    async fn connect_inner(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TlsStream<TcpStream>, TransportError> {
        let addresses: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|error| TransportError::Resolve {
                host: host.to_owned(),
                error,
            })?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for address in &addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(error) => last = Some((address.to_string(), error)),
            }
        }
        let tcp = match (tcp, last) {
            (Some(tcp), _) => tcp,
            (None, Some((address, error))) => {
                return Err(TransportError::Connect { address, error });
            }
            (None, None) => {
                return Err(TransportError::Resolve {
                    host: host.to_owned(),
                    error: std::io::Error::other("no addresses"),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        let name =
            ServerName::try_from(host.to_owned()).map_err(|_| TransportError::ServerName {
                host: host.to_owned(),
            })?;
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|error| TransportError::Tls {
                host: host.to_owned(),
                error,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extra_ca_must_hold_a_certificate() {
        let empty = ExtraCa {
            origin: "KIPS_RELAY_CA".into(),
            pem: "not a certificate".into(),
        };
        let Err(error) = RelayConnector::new(&[empty], Duration::from_secs(1)) else {
            panic!("accepted a CA without a certificate");
        };
        assert_eq!(error.to_string(), "KIPS_RELAY_CA: no PEM certificate in it");
        let ca = crate::tls::generate_ca("test", Duration::from_secs(60)).unwrap();
        let extra = ExtraCa {
            origin: "ca.crt".into(),
            pem: ca.cert,
        };
        assert!(RelayConnector::new(&[extra], Duration::from_secs(1)).is_ok());
    }
}
