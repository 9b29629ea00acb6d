//! The developer's kube client: kubeconfig flags, errors that say what went wrong, and a
//! patch that returns the API server's warnings (kube's typed API drops them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use kube::api::{Patch, PatchParams};
use kube::client::Body;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;

/// The usual kubeconfig flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster service account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, value_name = "NAME")]
    pub namespace: Option<String>,
}

/// A client, the namespace to work in, and where it points (for messages).
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub namespace: String,
    pub server: String,
    source: String,
}

impl KubeArgs {
    /// Builds the client. Nothing is sent yet; an unreachable server shows up at the first
    /// request, through [`Kube::explain`].
    pub async fn connect(&self) -> Result<Kube> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let (mut config, source) = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                let config = Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("using the kubeconfig {}", path.display()))?;
                (config, format!("kubeconfig {}", path.display()))
            }
            None if self.context.is_some() => (
                Config::from_kubeconfig(&options)
                    .await
                    .context("loading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
                "kubeconfig".to_owned(),
            ),
            None => (
                Config::infer().await.map_err(|e| {
                    anyhow!(
                        "no Kubernetes configuration found ({e}): set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config"
                    )
                })?,
                "kubeconfig".to_owned(),
            ),
        };
        let source = match &self.context {
            Some(context) => format!("{source}, context {context}"),
            None => source,
        };
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(Duration::from_secs(60));
        let server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)
            .with_context(|| format!("building a Kubernetes client for {server} ({source})"))?;
        Ok(Kube {
            client,
            namespace,
            server,
            source,
        })
    }
}

impl Kube {
    /// Turns a kube error into a message that names what was wrong: the object that does
    /// not exist, the permission that is missing, or the server that cannot be reached.
    pub fn explain(&self, error: kube::Error, what: &str) -> anyhow::Error {
        match error {
            kube::Error::Api(status) if status.code == 404 => {
                anyhow!("{what} not found in namespace {}", self.namespace)
            }
            kube::Error::Api(status) if status.code == 403 => {
                anyhow!("not allowed to read or change {what}: {}", status.message)
            }
            kube::Error::Api(status) => anyhow!("{what}: {}", api_message(&status)),
            other => self.unreachable(&other),
        }
    }

    pub fn unreachable(&self, error: &dyn std::error::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the Kubernetes API server at {} ({}): {}",
            self.server,
            self.source,
            error_chain(error)
        )
    }

    /// A merge patch of a namespaced object, returning the object and the API server's
    /// `Warning` headers (admission warnings, among them kips' own).
    pub async fn merge_patch_with_warnings<K>(
        &self,
        name: &str,
        patch: &serde_json::Value,
        what: &str,
    ) -> Result<(K, Vec<String>)>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let url = K::url_path(&(), Some(&self.namespace));
        let request = kube::core::Request::new(url)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .map_err(|e| anyhow!("building the patch of {what}: {e}"))?;
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
        let object = serde_json::from_slice(&body)
            .with_context(|| format!("reading the API server's answer for {what}"))?;
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
