//! A real `kips webhook` process for tests, and HTTPS clients that trust only its CA.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::control_plane::spawn_tied_to_process;

pub const KIPS: &str = env!("CARGO_BIN_EXE_kips");

/// A running `kips webhook`; killed when dropped.
pub struct Webhook {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Holds `ca.crt` (embedded default) and whatever the test put there.
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
}

impl Webhook {
    /// The embedded default on a free loopback port, with `extra` flags.
    pub fn start(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kips-webhook-").tempdir()?;
        let certs = dir.path().join("certs");
        let mut args: Vec<String> = vec![
            "webhook".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--certs-dir={}", certs.display()),
            "--log-format=json".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::spawn(dir, &args)
    }

    /// `kips` with exactly `args` (which must make it log its listening address).
    pub fn spawn(dir: tempfile::TempDir, args: &[String]) -> Result<Self> {
        let mut command = Command::new(KIPS);
        command
            .args(args)
            .env("KIPS_LOG", "info,kips=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied_to_process(command).context("starting kips webhook")?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = serving_addr(&line) {
                    let _ = addr_tx.send(addr);
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let mut webhook = Self {
            child: Some(child),
            addr: "0.0.0.0:0".parse()?,
            dir,
            logs,
        };
        match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => webhook.addr = addr,
            Err(_) => bail!(
                "kips webhook did not start serving; its log:\n{}",
                webhook.logs()
            ),
        }
        Ok(webhook)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("certs").join("ca.crt")
    }

    pub fn ca_pem(&self) -> Result<String> {
        std::fs::read_to_string(self.ca_path()).context("reading ca.crt")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// A client that trusts only `ca_pem`, speaking HTTP/1.1 or HTTP/2 (chosen by ALPN).
    pub fn client(&self, http2: bool) -> Result<reqwest::Client> {
        client_trusting(&self.ca_pem()?, http2)
    }

    /// SIGTERM, then waits up to `within` for a clean exit.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        self.signal_term()?;
        self.wait_exit(within)
    }

    /// Sends SIGTERM (the kubelet stopping the pod) without waiting.
    pub fn signal_term(&self) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("already stopped"))?;
        // SAFETY: kill has no memory effects; the pid is our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        Ok(())
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("already stopped"))?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "kips webhook did not exit within {within:?}; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (VmRSS, VmHWM) of the process in KiB: its resident memory now and at its peak.
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/<pid>/status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn serving_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value["message"] != "kips webhook serving HTTPS" {
        return None;
    }
    value["addr"].as_str()?.parse().ok()
}

pub fn rustls_client_config(ca_pem: &str, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

pub fn client_trusting(ca_pem: &str, http2: bool) -> Result<reqwest::Client> {
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(rustls_client_config(ca_pem, alpn)?)
        .timeout(Duration::from_secs(10));
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    Ok(builder.build()?)
}

/// Reads a fixture under `tests/fixtures/`.
pub fn fixture(path: &str) -> Result<String> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    std::fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))
}

pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A raw HTTP/1.1-over-TLS connection to `addr` that trusts only `ca_pem`, for tests that
/// need control of every byte (slow clients, requests in flight, peer certificates).
pub async fn tls_connect(addr: SocketAddr, ca_pem: &str) -> Result<TlsStream> {
    tls_connect_alpn(addr, ca_pem, b"http/1.1").await
}

/// A raw TLS connection offering one ALPN protocol (`h2` for hand-written HTTP/2 frames).
pub async fn tls_connect_alpn(addr: SocketAddr, ca_pem: &str, alpn: &[u8]) -> Result<TlsStream> {
    let config = rustls_client_config(ca_pem, &[alpn])?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(connector.connect("localhost".try_into()?, tcp).await?)
}

/// The request line and headers of a `POST /mutate` with a body of `length` bytes.
pub fn post_head(length: usize) -> String {
    format!("POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n")
}

/// Reads until the peer closes the connection; fails if it is still open after `within`.
pub async fn read_to_close(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the server kept the connection open"))?;
    Ok(out)
}

/// Writes `pair` into `dir/<version>/` and points `dir/..data` at it atomically, as the
/// kubelet does for Secret volumes; `dir/tls.crt` and `dir/tls.key` link through `..data`.
pub fn publish_secret_volume(dir: &Path, version: &str, pair: &kips::tls::PemPair) -> Result<()> {
    use std::os::unix::fs::symlink;
    let target = dir.join(version);
    std::fs::create_dir_all(&target)?;
    std::fs::write(target.join("tls.crt"), &pair.cert)?;
    std::fs::write(target.join("tls.key"), &pair.key)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(version, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for file in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(file)).is_err() {
            symlink(Path::new("..data").join(file), dir.join(file))?;
        }
    }
    Ok(())
}

/// The DER of a pair's leaf certificate.
pub fn leaf_der(pair: &kips::tls::PemPair) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pair.cert.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// The leaf certificate a TLS connection was served.
pub fn served_leaf(stream: &TlsStream) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .to_vec()
}

/// Waits until a new handshake with the webhook is served `expected`.
pub async fn wait_for_leaf(webhook: &Webhook, ca_pem: &str, expected: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if served_leaf(&tls_connect(webhook.addr, ca_pem).await?) == expected {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!(
        "new handshakes never saw the new certificate; log:\n{}",
        webhook.logs()
    )
}
