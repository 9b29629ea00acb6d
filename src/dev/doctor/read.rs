//! The reading of `kips doctor` (I/O): the dry-run pod, the webhooks' served chains, the
//! evidence about kips' images.

use super::*;

/// Events since the epoch: every `FailedCreate` event still kept counts.
pub(super) fn jiff_epoch() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::UNIX_EPOCH
}

/// The dry-run pod: annotated for kips in named mode, with a container that passes Pod
/// Security `restricted`, so only the webhook decides what happens to it.
pub(super) fn probe_pod() -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "kips-doctor-",
            "labels": {"app.kubernetes.io/name": "kips-doctor"},
            "annotations": {"kips.io/redirect": "kips-doctor:http", "kips.io/port-mode": "named"}
        },
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "image": PROBE_IMAGE,
                "ports": [{"name": "http", "containerPort": 8080}],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))
    .expect("a valid pod")
}

pub(super) async fn dry_run(kube: &Kube) -> DryRun {
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match kube.api::<Pod>().create(&params, &probe_pod()).await {
        Ok(pod) => DryRun::Admitted(Box::new(pod)),
        Err(kube::Error::Api(status)) if status.code != 403 => DryRun::Refused(status.message),
        Err(error) => DryRun::Failed(kube.explain(error, "a dry-run pod").to_string()),
    }
}

/// For each webhook: its bundle and what it serves, read from the URL or from its
/// certificate Secret.
pub(super) async fn read_trust(
    kube: &Kube,
    config: &MutatingWebhookConfiguration,
) -> Vec<WebhookTrust> {
    let mut out = Vec::new();
    for webhook in config.webhooks.iter().flatten() {
        let client_config = &webhook.client_config;
        let bundle = client_config
            .ca_bundle
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default();
        let endpoint = endpoint(client_config);
        let (server_name, served) = match (&client_config.url, &client_config.service) {
            (Some(url), _) => match url_host_port(url) {
                Some((host, port)) => {
                    let served = match fetch_chain(host.clone(), port).await {
                        Ok(chain) => Served::Handshake(chain),
                        Err(error) => Served::Unreachable(error.to_string()),
                    };
                    (host, served)
                }
                None => (
                    url.clone(),
                    Served::Unusable(format!("its url {url} is not an https:// URL")),
                ),
            },
            (None, Some(service)) => {
                let secret = format!("{}-webhook-tls", service.name);
                let server_name = format!("{}.{}.svc", service.name, service.namespace);
                let read = kube
                    .in_namespace(&service.namespace)
                    .api::<Secret>()
                    .get(&secret)
                    .await
                    .map_err(|e| {
                        kube.in_namespace(&service.namespace)
                            .explain(e, &format!("Secret {secret}"))
                            .to_string()
                    });
                let served = match read {
                    Ok(s) => match s.data.as_ref().and_then(|d| d.get("tls.crt")) {
                        Some(cert) => Served::Secret {
                            secret: format!("{}/{secret}", service.namespace),
                            cert: String::from_utf8_lossy(&cert.0).into_owned(),
                        },
                        None => Served::SecretUnreadable {
                            secret: format!("{}/{secret}", service.namespace),
                            error: "it has no tls.crt".to_owned(),
                        },
                    },
                    Err(error) => Served::SecretUnreadable {
                        secret: format!("{}/{secret}", service.namespace),
                        error,
                    },
                };
                (server_name, served)
            }
            (None, None) => (
                String::new(),
                Served::Unusable("its clientConfig has neither url nor service".to_owned()),
            ),
        };
        out.push(WebhookTrust {
            webhook: webhook.name.clone(),
            bundle,
            endpoint,
            server_name,
            served,
        });
    }
    out
}

/// Why the served chain could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    #[error("connecting to {address}: {error}")]
    Connect {
        address: String,
        error: std::io::Error,
    },
    #[error("TLS handshake with {address}: {error}")]
    Handshake {
        address: String,
        error: std::io::Error,
    },
    #[error("{0:?} is not a host name or address")]
    Name(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the server sent no certificate")]
    NoCertificate,
    #[error("the handshake did not finish: {0}")]
    Join(String),
}

/// Completes a TLS handshake with `host:port`, accepting any certificate, and returns the
/// chain it was given: the trust decision is made afterwards against the caBundle.
pub(super) async fn fetch_chain(
    host: String,
    port: u16,
) -> Result<Vec<CertificateDer<'static>>, FetchError> {
    tokio::task::spawn_blocking(move || fetch_chain_blocking(&host, port))
        .await
        .map_err(|e| FetchError::Join(e.to_string()))?
}

pub(super) fn fetch_chain_blocking(
    host: &str,
    port: u16,
) -> Result<Vec<CertificateDer<'static>>, FetchError> {
    use std::net::ToSocketAddrs;
    let address = format!("{host}:{port}");
    let connect_error = |error| FetchError::Connect {
        address: address.clone(),
        error,
    };
    let target = (host, port)
        .to_socket_addrs()
        .map_err(connect_error)?
        .next()
        .ok_or_else(|| FetchError::Name(host.to_owned()))?;
    let mut tcp =
        std::net::TcpStream::connect_timeout(&target, TLS_TIMEOUT).map_err(connect_error)?;
    tcp.set_read_timeout(Some(TLS_TIMEOUT))
        .map_err(connect_error)?;
    tcp.set_write_timeout(Some(TLS_TIMEOUT))
        .map_err(connect_error)?;
    let provider = crate::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RecordOnly(provider)))
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.to_owned()).map_err(|_| FetchError::Name(host.to_owned()))?;
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)
            .map_err(|error| FetchError::Handshake {
                address: address.clone(),
                error,
            })?;
    }
    let chain = tls
        .peer_certificates()
        .ok_or(FetchError::NoCertificate)?
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    tls.send_close_notify();
    let _ = tls.complete_io(&mut tcp);
    Ok(chain)
}

/// Accepts any certificate (with valid signatures on the handshake): `kips doctor` reads the
/// chain to judge it against the caBundle itself, and sends nothing over the connection.
#[derive(Debug)]
pub(super) struct RecordOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for RecordOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// kips' images and what is known of them: from the workload's injected pods (their specs,
/// container statuses and events), else from the dry-run pod; and the nodes' image lists.
pub(super) async fn image_evidence(
    kube: &Kube,
    pods: &[Pod],
    probe: Option<&Pod>,
    mode: Option<&ModeOf>,
) -> ImageEvidence {
    let injected: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(STATUS))
        })
        .collect();
    let mut evidence = ImageEvidence::default();
    let mut seen = BTreeSet::new();
    let mut add_images = |evidence: &mut ImageEvidence, pod: &Pod| {
        for name in [BRIDGE_CONTAINER, INIT_CONTAINER] {
            if let Some(image) = injected_image(pod, name)
                && seen.insert((name, image.clone()))
            {
                evidence.images.push((name.to_owned(), image));
            }
        }
    };
    if injected.is_empty() {
        if let Some(probe) = probe {
            add_images(&mut evidence, probe);
            evidence.from = "the dry-run pod".to_owned();
            if mode.is_some_and(|m| m.mode == PortMode::Iptables) {
                evidence.note = Some(
                    "kips-init's image (iptables mode) shows here once a pod is injected".into(),
                );
            }
        }
    } else {
        for pod in &injected {
            add_images(&mut evidence, pod);
        }
        evidence.from = format!(
            "pod{} {}",
            if injected.len() == 1 { "" } else { "s" },
            injected
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for pod in &injected {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let Some(status) = &pod.status else { continue };
        for container in status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .filter(|c| is_kips_container(&c.name))
        {
            let image = injected_image(pod, &container.name).unwrap_or(container.image.clone());
            let state = container.state.as_ref();
            if let Some(waiting) = state.and_then(|s| s.waiting.as_ref())
                && let Some(reason) = waiting.reason.as_deref()
                && PULL_FAILURES.contains(&reason)
            {
                evidence.failures.push(PullFailure {
                    pod: pod_name.clone(),
                    container: container.name.clone(),
                    image: image.clone(),
                    reason: reason.to_owned(),
                    message: waiting.message.clone().unwrap_or_default(),
                });
            } else if state.is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                && !node.is_empty()
            {
                evidence.started.insert(image, node.clone());
            }
        }
    }
    // The kubelet's events name the container in fieldPath: `spec.initContainers{kips-bridge}`.
    if !injected.is_empty() {
        let events = kube
            .api::<Event>()
            .list(&ListParams::default().fields("involvedObject.kind=Pod"))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        for event in events {
            let reason = event.reason.clone().unwrap_or_default();
            if !matches!(reason.as_str(), "Failed" | "ErrImageNeverPull" | "BackOff") {
                continue;
            }
            let object = &event.involved_object;
            let Some(pod) = injected
                .iter()
                .find(|p| p.metadata.name.is_some() && p.metadata.name == object.name)
            else {
                continue;
            };
            let Some(container) = object
                .field_path
                .as_deref()
                .and_then(container_of_field_path)
            else {
                continue;
            };
            let message = event.message.clone().unwrap_or_default();
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            if !is_kips_container(container)
                || !message.to_ascii_lowercase().contains("image")
                || evidence
                    .failures
                    .iter()
                    .any(|f| f.pod == pod_name && f.container == container)
            {
                continue;
            }
            evidence.failures.push(PullFailure {
                pod: pod_name,
                container: container.to_owned(),
                image: injected_image(pod, container).unwrap_or_default(),
                reason,
                message,
            });
        }
    }
    evidence.nodes = Api::<Node>::all(kube.client.clone())
        .list(&ListParams::default())
        .await
        .ok()
        .map(|nodes| {
            nodes
                .items
                .into_iter()
                .map(|n| {
                    let images = n
                        .status
                        .and_then(|s| s.images)
                        .into_iter()
                        .flatten()
                        .flat_map(|i| i.names.unwrap_or_default())
                        .collect();
                    (n.metadata.name.unwrap_or_default(), images)
                })
                .collect()
        });
    evidence
}

/// `kips-bridge` of `spec.initContainers{kips-bridge}`.
pub(super) fn container_of_field_path(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once('{')?;
    rest.strip_suffix('}')
}
