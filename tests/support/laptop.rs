//! The developer's side of the node suites, on the host: the test relay (`kips relay`, on the
//! host end of the node's veth, where pods reach it), local apps that answer like the
//! developer's app, and `kips connect` runs. Every process is tied to the test binary (it
//! cannot outlive it) and killed when its guard drops.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::spawn_tied_to_process;
use super::scenario::KIPS;

/// The relay's shared access key (`root`), base64 as Azure gives them.
pub const KEY_NAME: &str = "root";
pub const KEY: &str = "a2lwcy1ub2RlLXN1aXRlLWtleQ==";

/// A process whose output goes to a log file; killed on drop.
pub struct Logged {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Logged {
    pub fn spawn(name: &str, dir: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(KIPS);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env_remove("KIPS_AZBRIDGE")
            .env_remove("KIPS_RELAY_CONNECTION_STRING")
            .env_remove("KIPS_RELAY_CA");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = spawn_tied_to_process(command).with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: a plain kill(2) of our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGINT (what Ctrl-C sends), then its exit code within `limit`.
    pub async fn interrupt(&mut self, limit: Duration) -> Result<Option<i32>> {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().context("already stopped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not stop within {limit:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kips relay` on `address` (the host end of the node's veth) with a test CA.
pub struct TestRelay {
    pub process: Logged,
    pub address: SocketAddr,
    pub ca_pem: String,
}

impl TestRelay {
    /// Serves `hybrid_connections` with the key [`KEY_NAME`]=[`KEY`] on a free port.
    pub async fn start(host: Ipv4Addr, dir: &Path, hybrid_connections: &[&str]) -> Result<Self> {
        let port = std::net::TcpListener::bind((host, 0))?.local_addr()?.port();
        let address = SocketAddr::from((host, port));
        let ready = dir.join("relay.ready");
        let mut args = vec![
            "relay".to_owned(),
            format!("--listen={address}"),
            format!("--dir={}", dir.join("relay-ca").display()),
            format!("--name={host}"),
            format!("--key={KEY_NAME}={KEY}"),
            format!("--ready-file={}", ready.display()),
        ];
        args.extend(
            hybrid_connections
                .iter()
                .map(|h| format!("--hybrid-connection={h}")),
        );
        let process = Logged::spawn("relay", dir, &args, &[])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!("kips relay did not start:\n{}", process.log_text());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let ca_pem = std::fs::read_to_string(dir.join("relay-ca/ca.crt"))?;
        Ok(Self {
            process,
            address,
            ca_pem,
        })
    }

    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY}",
            self.address
        )
    }

    /// The relay Secret `kips-relay` in `ns`: the connection string and the relay's CA
    /// (`ca.crt`, which the kips engine trusts beside the public roots).
    pub async fn create_secret(&self, client: &Client, ns: &str) -> Result<()> {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "kips-relay"},
            "stringData": {"connectionString": self.connection_string(), "ca.crt": self.ca_pem}
        }))?;
        Api::<Secret>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }
}

/// An HTTP server on the host's loopback that answers every request with `answer`: the
/// developer's app.
pub async fn http_app(answer: &'static str) -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(port)
}

/// `kips connect <workload> -n <ns> --connection-string-from-secret` on the host, with the
/// built-in bridge; `extra` adds flags (`--port-map`, `--hosts-file`).
pub fn kips_connect(
    dir: &Path,
    kubeconfig: &Path,
    ns: &str,
    workload: &str,
    extra: &[&str],
) -> Result<Logged> {
    let mut args: Vec<String> = [
        "connect",
        workload,
        "-n",
        ns,
        "--connection-string-from-secret",
        "--kubeconfig",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    args.push(kubeconfig.display().to_string());
    if !extra.contains(&"--hosts-file") {
        args.push("--hosts-file".to_owned());
        args.push(dir.join("hosts").display().to_string());
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let name = format!("connect-{}", workload.replace('/', "-"));
    Logged::spawn(&name, dir, &args, &[])
}
