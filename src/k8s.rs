//! The one place kips builds a Kubernetes client, turns the API server's failures into errors
//! that say what went wrong, and dispatches over the workload kinds. Used by the webhook's
//! cluster hooks, the certificate code and the developer's commands alike; each says how
//! patient its client must be ([`ClientSettings`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::api::{ListParams, Patch, PatchParams};
use kube::client::Body;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::workload::{Workload, WorkloadKind, WorkloadRef};

/// Where the cluster is: the usual kubeconfig choices of a command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeTarget {
    /// Default: $KUBECONFIG, then ~/.kube/config, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Default: the context's namespace, else `default`.
    pub namespace: Option<String>,
}

/// How a client finds the cluster and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub target: KubeTarget,
    /// Try the in-cluster service account before any kubeconfig (a webhook in a pod).
    pub in_cluster_first: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Let kube retry failed requests; admission-time lookups must not wait on retries.
    pub retry: bool,
}

impl ClientSettings {
    /// A person at a terminal: generous timeouts.
    pub fn interactive(target: KubeTarget) -> Self {
        Self {
            target,
            in_cluster_first: false,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            retry: true,
        }
    }

    /// The webhook's lookups during admission: a lookup either answers within `connect` or
    /// is skipped.
    pub fn admission(kubeconfig: Option<PathBuf>, connect: Duration) -> Self {
        Self {
            target: KubeTarget {
                kubeconfig,
                ..Default::default()
            },
            in_cluster_first: true,
            connect_timeout: connect,
            read_timeout: Duration::from_secs(5),
            retry: false,
        }
    }

    /// `kips doctor`: a person waiting for a verdict, which a hung server must not delay;
    /// no retries, so a failure shows as it is.
    pub fn diagnostic(target: KubeTarget) -> Self {
        Self {
            target,
            in_cluster_first: false,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(20),
            retry: false,
        }
    }

    /// The certificate loop: a hung API server must not stall it for minutes.
    pub fn background(kubeconfig: Option<PathBuf>) -> Self {
        Self {
            target: KubeTarget {
                kubeconfig,
                ..Default::default()
            },
            in_cluster_first: false,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retry: true,
        }
    }
}

/// A failure to reach or use the API server, naming what was asked for.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "no Kubernetes configuration found ({0}): set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config"
    )]
    NoConfig(String),
    #[error("{source_name}: {error}")]
    Config { source_name: String, error: String },
    #[error("the cluster URL {0} has no host")]
    NoHost(String),
    #[error("building a Kubernetes client for {server} ({source_name}): {error}")]
    Client {
        server: String,
        source_name: String,
        error: String,
    },
    #[error("{what} not found in namespace {namespace}")]
    NotFound { what: String, namespace: String },
    #[error("not allowed to read or change {what}: {message}")]
    Forbidden { what: String, message: String },
    #[error("{what}: {message}")]
    Api {
        what: String,
        code: u16,
        message: String,
    },
    #[error("cannot reach the Kubernetes API server at {server} ({source_name}): {chain}")]
    Unreachable {
        server: String,
        source_name: String,
        chain: String,
    },
    #[error("reading the API server's answer for {what}: {error}")]
    Answer {
        what: String,
        error: serde_json::Error,
    },
}

/// A client, the namespace to work in, and where it points (for messages).
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub namespace: String,
    pub server: String,
    source: String,
}

/// Builds the client. Nothing is sent yet: an unreachable server shows up at the first
/// request, as [`K8sError::Unreachable`].
pub async fn connect(settings: &ClientSettings) -> Result<Kube, K8sError> {
    // kube's TLS needs a process-wide rustls provider; another caller may have set one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let target = &settings.target;
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..Default::default()
    };
    let config_error = |source_name: &str| {
        let source_name = source_name.to_owned();
        move |error: kube::config::KubeconfigError| K8sError::Config {
            source_name,
            error: error.to_string(),
        }
    };
    let (mut config, source) = match &target.kubeconfig {
        Some(path) => {
            let source = format!("kubeconfig {}", path.display());
            let kubeconfig = Kubeconfig::read_from(path).map_err(config_error(&format!(
                "reading the kubeconfig {}",
                path.display()
            )))?;
            let config = Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(config_error(&format!(
                    "using the kubeconfig {}",
                    path.display()
                )))?;
            (config, source)
        }
        None if target.context.is_some() => (
            Config::from_kubeconfig(&options)
                .await
                .map_err(config_error(
                    "loading the kubeconfig ($KUBECONFIG or ~/.kube/config)",
                ))?,
            "kubeconfig".to_owned(),
        ),
        None => {
            let in_cluster = settings
                .in_cluster_first
                .then(Config::incluster)
                .and_then(Result::ok);
            let config = match in_cluster {
                Some(config) => config,
                None => Config::infer()
                    .await
                    .map_err(|e| K8sError::NoConfig(e.to_string()))?,
            };
            (config, "kubeconfig".to_owned())
        }
    };
    let source = match &target.context {
        Some(context) => format!("{source}, context {context}"),
        None => source,
    };
    config.connect_timeout = Some(settings.connect_timeout);
    config.read_timeout = Some(settings.read_timeout);
    if !settings.retry {
        config.default_retry = false;
    }
    if config.cluster_url.host().is_none() {
        return Err(K8sError::NoHost(config.cluster_url.to_string()));
    }
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_owned();
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| K8sError::Client {
        server: server.clone(),
        source_name: source.clone(),
        error: e.to_string(),
    })?;
    Ok(Kube {
        client,
        namespace,
        server,
        source,
    })
}

/// Runs `$body` with `$K` bound to the typed object of `$kind`: the one place the three
/// workload kinds are told apart for the API.
macro_rules! for_kind {
    ($kind:expr, $K:ident => $body:expr) => {
        match $kind {
            WorkloadKind::Deployment => {
                type $K = Deployment;
                $body
            }
            WorkloadKind::StatefulSet => {
                type $K = StatefulSet;
                $body
            }
            WorkloadKind::DaemonSet => {
                type $K = DaemonSet;
                $body
            }
        }
    };
}

impl Kube {
    /// Where the configuration came from (`kubeconfig`, `kubeconfig PATH, context NAME`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The same client, working in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Kube {
        Kube {
            namespace: namespace.to_owned(),
            ..self.clone()
        }
    }

    /// The typed API of `K` in this client's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Turns a kube error into one that names what was wrong: the object that does not exist,
    /// the permission that is missing, or the server that cannot be reached.
    pub fn explain(&self, error: kube::Error, what: &str) -> K8sError {
        let what = what.to_owned();
        match error {
            kube::Error::Api(status) if status.code == 404 => K8sError::NotFound {
                what,
                namespace: self.namespace.clone(),
            },
            kube::Error::Api(status) if status.code == 403 => K8sError::Forbidden {
                what,
                message: status.message.clone(),
            },
            kube::Error::Api(status) => K8sError::Api {
                what,
                code: status.code,
                message: api_message(&status),
            },
            other => self.unreachable(&other),
        }
    }

    pub fn unreachable(&self, error: &dyn std::error::Error) -> K8sError {
        K8sError::Unreachable {
            server: self.server.clone(),
            source_name: self.source.clone(),
            chain: error_chain(error),
        }
    }

    /// Reads one workload.
    pub async fn workload(&self, target: &WorkloadRef) -> Result<Workload, K8sError> {
        let explain = |e| self.explain(e, &target.to_string());
        for_kind!(target.kind, K => self
            .api::<K>()
            .get(&target.name)
            .await
            .map(Workload::from)
            .map_err(explain))
    }

    /// Reads one workload, `None` when it does not exist.
    pub async fn workload_opt(
        &self,
        kind: WorkloadKind,
        name: &str,
    ) -> Result<Option<Workload>, kube::Error> {
        for_kind!(kind, K => Ok(self.api::<K>().get_opt(name).await?.map(Workload::from)))
    }

    /// Every workload of `kind` in the namespace, or in all of them.
    pub async fn workloads(
        &self,
        kind: WorkloadKind,
        all: bool,
    ) -> Result<Vec<Workload>, K8sError> {
        let what = format!("{}s", kind.kind());
        for_kind!(kind, K => self.list::<K, Workload>(all, &what, &ListParams::default()).await)
    }

    /// Lists `K` in the namespace (or all namespaces), as `T`.
    pub async fn list<K, T>(
        &self,
        all: bool,
        what: &str,
        params: &ListParams,
    ) -> Result<Vec<T>, K8sError>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        T: From<K>,
    {
        let api = if all {
            Api::<K>::all(self.client.clone())
        } else {
            self.api::<K>()
        };
        Ok(api
            .list(params)
            .await
            .map_err(|e| self.explain(e, what))?
            .items
            .into_iter()
            .map(T::from)
            .collect())
    }

    /// Merge-patches a workload's metadata annotations (`null` removes one), returning the
    /// workload as stored and the API server's warnings (admission warnings, kips' among them).
    pub async fn patch_annotations(
        &self,
        target: &WorkloadRef,
        annotations: &BTreeMap<&str, Value>,
    ) -> Result<(Workload, Vec<String>), K8sError> {
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        let what = target.to_string();
        for_kind!(target.kind, K => {
            let (object, warnings) = self
                .merge_patch_with_warnings::<K>(&target.name, &patch, &what)
                .await?;
            Ok((Workload::from(object), warnings))
        })
    }

    /// A merge patch of a namespaced object, returning the object and the API server's
    /// `Warning` headers (kube's typed API drops them).
    async fn merge_patch_with_warnings<K>(
        &self,
        name: &str,
        patch: &Value,
        what: &str,
    ) -> Result<(K, Vec<String>), K8sError>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let url = K::url_path(&(), Some(&self.namespace));
        let request = kube::core::Request::new(url)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .map_err(|e| self.explain(kube::Error::BuildRequest(e), what))?;
        let response = self
            .client
            .send(request.map(Body::from))
            .await
            .map_err(|e| self.explain(e, what))?;
        let warnings: Vec<String> = response
            .headers()
            .get_all("warning")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_warning)
            .collect();
        let status = response.status();
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .map_err(|e| self.explain(e, what))?;
        if !status.is_success() {
            let parsed: Option<kube::core::Status> = serde_json::from_slice(&body).ok();
            let mut status_object = parsed.unwrap_or_default();
            if status_object.message.is_empty() {
                status_object.message = String::from_utf8_lossy(&body).into_owned();
            }
            status_object.code = status.as_u16();
            return Err(self.explain(kube::Error::Api(Box::new(status_object)), what));
        }
        let object = serde_json::from_slice(&body).map_err(|error| K8sError::Answer {
            what: what.to_owned(),
            error,
        })?;
        Ok((object, warnings))
    }
}

/// The message of a failed request, with a hint when kips' webhook could not be called.
pub fn api_message(status: &kube::core::Status) -> String {
    let message = if status.message.is_empty() {
        format!("{} ({})", status.reason, status.code)
    } else {
        status.message.clone()
    };
    if message.contains("failed calling webhook") && message.contains("kips") {
        format!(
            "{message}\nthe kips webhook is unreachable: is it installed (helm install kips charts/kips -n kips-system) and are its pods ready?"
        )
    } else {
        message
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = inner.source();
    }
    parts.join(": ")
}

/// The text of a `Warning` header (RFC 7234: `299 - "text"`), unescaped.
pub fn parse_warning(header: &str) -> Option<String> {
    let header = header.trim();
    let (code, rest) = header.split_once(' ')?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_agent, quoted) = rest.trim_start().split_once(' ')?;
    let quoted = quoted.trim_start().strip_prefix('"')?;
    let mut text = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => text.push(chars.next()?),
            '"' => return Some(text),
            c => text.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_headers_are_unquoted() {
        assert_eq!(
            parse_warning(r#"299 - "kips: relay Secret \"kips-relay\" is missing""#).unwrap(),
            r#"kips: relay Secret "kips-relay" is missing"#
        );
        assert_eq!(parse_warning("299 - \"a\\\\b\"").unwrap(), "a\\b");
        assert_eq!(parse_warning("nonsense"), None);
        assert_eq!(parse_warning("299 - \"unterminated"), None);
    }

    #[test]
    fn webhook_failures_get_a_hint() {
        let status = kube::core::Status {
            message: "Internal error occurred: failed calling webhook \"workloads.kips.io\": connection refused".into(),
            code: 500,
            ..Default::default()
        };
        assert!(api_message(&status).contains("the kips webhook is unreachable"));
    }
}
