//! Real `kips relay` and `kips bridge` processes for the bridge suites, and the servers they
//! forward to. Every process is killed when its guard drops (panics included) and cannot
//! outlive the test binary (`process::spawn_tied_to_process`); a failing test prints the
//! logs of the processes it started.
#![allow(dead_code)] // each suite uses a different part

#[path = "process.rs"]
mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

pub const KIPS: &str = env!("CARGO_BIN_EXE_kips");

/// The key every suite's relay knows (`root`, namespace-wide, listen and send).
pub const KEY_NAME: &str = "root";
pub const KEY: &str = "a2lwcy10ZXN0LWtleQ==";

/// A child process with its output in a log file; killed on drop.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    pub fn spawn(
        name: &str,
        program: &str,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
    ) -> Result<Process> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if !env.iter().any(|(k, _)| *k == "KIPS_LOG") {
            command.env("KIPS_LOG", "info,kips=debug");
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child =
            process::spawn_tied_to_process(command).with_context(|| format!("starting {name}"))?;
        Ok(Process {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// The exit status once the process ends within `limit`.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- {} (last lines) -----", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A loopback port nobody listens on (a moment later someone may: tests bind it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory")
}

/// A `kips relay` on a fixed port (so that it can be restarted on the same one).
pub struct Relay {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    process: Option<Process>,
    starts: u32,
}

impl Relay {
    /// Hybrid connections `entities`; the suite key plus `extra_keys` (`[hc/]name=key[:rights]`).
    pub async fn start(dir: &Path, entities: &[&str], extra_keys: &[&str]) -> Result<Relay> {
        Self::start_on(dir, free_port(), entities, extra_keys).await
    }

    pub async fn start_on(
        dir: &Path,
        port: u16,
        entities: &[&str],
        extra_keys: &[&str],
    ) -> Result<Relay> {
        let mut relay = Self::prepare(dir, port, entities, extra_keys);
        relay.restart().await?;
        Ok(relay)
    }

    /// A relay that is not running yet ([`Relay::restart`] starts it).
    pub fn prepare(dir: &Path, port: u16, entities: &[&str], extra_keys: &[&str]) -> Relay {
        let mut args: Vec<String> = vec![
            "relay".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--dir={}", dir.join("relay-ca").display()),
            "--accept-timeout=10s".into(),
            format!("--ready-file={}", dir.join("relay.ready").display()),
            format!("--key={KEY_NAME}={KEY}"),
        ];
        args.extend(entities.iter().map(|e| format!("--hybrid-connection={e}")));
        args.extend(extra_keys.iter().map(|k| format!("--key={k}")));
        Relay {
            port,
            dir: dir.to_owned(),
            args,
            process: None,
            starts: 0,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("relay-ca/ca.crt")
    }

    pub fn connection_string(&self) -> String {
        self.connection_string_with(KEY_NAME, KEY)
    }

    pub fn connection_string_with(&self, key_name: &str, key: &str) -> String {
        format!(
            "Endpoint=sb://localhost:{}/;SharedAccessKeyName={key_name};SharedAccessKey={key}",
            self.port
        )
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    pub fn log_text(&self) -> String {
        self.process
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    /// Starts (again) on the same port and waits until it serves.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let ready = self.dir.join("relay.ready");
        let _ = std::fs::remove_file(&ready);
        self.starts += 1;
        let process = Process::spawn(
            &format!("relay-{}", self.starts),
            KIPS,
            &self.args,
            &[],
            &self.dir,
        )?;
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!("kips relay did not start; its log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }
}

/// A `kips bridge` with a health port.
pub struct Bridge {
    pub process: Process,
    pub health: u16,
}

impl Bridge {
    /// `kips bridge -x <relay's string> --relay-ca <relay's CA> --health-listen … <args>`.
    pub fn start(name: &str, relay: &Relay, args: &[&str]) -> Result<Bridge> {
        Self::start_with(name, relay, &relay.connection_string(), args)
    }

    pub fn start_with(
        name: &str,
        relay: &Relay,
        connection_string: &str,
        args: &[&str],
    ) -> Result<Bridge> {
        let health = free_port();
        let mut all: Vec<String> = vec![
            "bridge".into(),
            "-x".into(),
            connection_string.to_owned(),
            format!("--relay-ca={}", relay.ca().display()),
            format!("--health-listen=127.0.0.1:{health}"),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let process = Process::spawn(name, KIPS, &all, &[], &relay.dir)?;
        Ok(Bridge { process, health })
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.health, path).await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = self.get("/readyz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                let answer = self.get("/readyz").await;
                bail!("bridge not ready after {limit:?}: {answer:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// A plain HTTP/1.0 GET on loopback: status and body.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Reads until EOF, then answers with every byte read XOR `0x5a` and closes: a reply that
/// only a half-closed connection can produce, different from the request.
pub async fn reply_after_eof_server() -> SocketAddr {
    serve(|mut stream| async move {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await?;
        let reply: Vec<u8> = request.iter().map(|b| b ^ 0x5a).collect();
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await
}

/// Writes `tag` and closes.
pub async fn tag_server(tag: &'static str) -> SocketAddr {
    serve(move |mut stream| async move {
        stream.write_all(tag.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
}

/// Echoes until EOF, then closes.
pub async fn echo_server() -> SocketAddr {
    serve(|stream| async move {
        let (mut read, mut write) = stream.into_split();
        tokio::io::copy(&mut read, &mut write).await?;
        write.shutdown().await
    })
    .await
}

async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a test server");
    let address = listener.local_addr().expect("its address");
    let handler = std::sync::Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = handler(stream).await;
            });
        }
    });
    address
}

/// A UDP echo server on loopback.
pub async fn udp_echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("binding a UDP echo server");
    let address = socket.local_addr().expect("its address");
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..n], from).await;
        }
    });
    address
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// Sends `request` on a new connection to `address`, half-closes, and reads to the end.
pub async fn exchange(address: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(request).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    Ok(reply)
}

/// Polls `check` until it returns Some, up to `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of a Prometheus sample whose line contains all of `parts`.
pub fn metric(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name))
        .find(|line| parts.iter().all(|p| line.contains(p)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}
