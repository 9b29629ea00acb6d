//! The two servers under test, each a process of its own pinned to the server core:
//! `kips webhook` (the real release binary, embedded default certificates) and the ceiling
//! (this bench binary re-executed as `ceiling-server`: kips' HTTPS stack, `Server::serve_router`,
//! with a `/mutate` that reads the body and answers a fixed, pre-serialised review).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Limited};
use kips::webhook::{MAX_BODY_BYTES, Server, ServerSettings};

/// Which server a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Kips,
    Ceiling,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Kips => "kips",
            Role::Ceiling => "ceiling",
        }
    }
}

/// A running server process; killed (and reaped) when dropped, and also when this bench
/// process dies (PR_SET_PDEATHSIG), so no server outlives a failed run.
pub struct ServerProcess {
    pub role: Role,
    pub port: u16,
    pub ca_pem: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// Pins the calling thread (and the threads it starts later) to one CPU.
pub fn pin_to_core(core: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A free loopback port (released again: the server binds it a moment later).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The command for `role`, listening on `port`, writing its CA under `certs_dir`.
pub fn command(role: Role, kips: &Path, port: u16, certs_dir: &Path, core: usize) -> Command {
    let listen = format!("--listen=127.0.0.1:{port}");
    let certs = format!("--certs-dir={}", certs_dir.display());
    let mut command = match role {
        Role::Kips => {
            let mut command = Command::new(kips);
            command.args(["webhook", &listen, &certs]);
            command
        }
        Role::Ceiling => {
            let mut command =
                Command::new(std::env::current_exe().expect("the bench binary's path"));
            command.args(["ceiling-server", &listen, &certs]);
            command
        }
    };
    // Both log at kips' default level (info); neither inherits a tuned KIPS_LOG.
    command.env_remove("KIPS_LOG").stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            pin_to_core(core)?;
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

impl ServerProcess {
    /// Starts `role` on `core` and waits until it accepts connections.
    pub fn start(role: Role, kips: &Path, core: usize) -> Result<Self> {
        Self::start_with(role, kips, core, &[], None)
    }

    /// Starts `role` with `extra` flags. With `ca_pem` (the CA of certificates given by the
    /// flags), waits only until it accepts connections; otherwise also for the CA it writes.
    pub fn start_with(
        role: Role,
        kips: &Path,
        core: usize,
        extra: &[String],
        ca_pem: Option<String>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kips-bench-").tempdir()?;
        let certs = dir.path().join("certs");
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let given_ca = ca_pem.is_some();
        let child = command(role, kips, port, &certs, core)
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {} server", role.name()))?;
        let mut server = Self {
            role,
            port,
            ca_pem: ca_pem.unwrap_or_default(),
            child,
            _dir: dir,
        };
        let ca_path = certs.join("ca.crt");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the {} server exited with {status}; its log:\n{}",
                    role.name(),
                    server.log()
                );
            }
            if (given_ca || ca_path.exists())
                && TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
            {
                if !given_ca {
                    server.ca_pem = std::fs::read_to_string(&ca_path)?;
                }
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} server did not start; log:\n{}",
                    role.name(),
                    server.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }

    /// (VmRSS, VmHWM) in KiB, from /proc: the process's own resident memory and its peak.
    pub fn memory_kib(&self) -> (u64, u64) {
        memory_kib(self.pid())
    }

    /// User + system CPU time the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        process_cpu_time(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn process_cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// CPU time of this (client) process, all threads.
pub fn own_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// `ceiling-server`: kips' HTTPS stack with the same TLS setup, runtime, tracing and layers,
/// answering every `/mutate` with one pre-serialised review (kips' own answer to the typical
/// pod) after reading the body, without parsing it.
pub fn run_ceiling(listen: SocketAddr, certs_dir: PathBuf) -> Result<()> {
    kips::logging::init(kips::logging::LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let validity = Duration::from_secs(24 * 3600);
        let ca = kips::tls::generate_ca("kips bench ceiling CA", validity)?;
        let pair = kips::tls::issue_serving_cert(&ca, &kips::tls::local_names(&[]), validity)?;
        kips::tls::write_atomically(&certs_dir.join("ca.crt"), &ca.cert)?;
        let store = kips::tls::CertStore::new(pair, Arc::new(kips::webhook::Metrics::new()))?;
        let typical = crate::common::fixture("pod", "typical");
        let answer = Bytes::from(
            kips::webhook::review::review(&typical.body, &kips::inject::InjectConfig::default())
                .body,
        );
        let settings = ServerSettings::default();
        let app = Router::new()
            .route(
                "/mutate",
                post(move |body: Body| fixed_answer(body, answer.clone())),
            )
            .route("/healthz", get(|| async { "ok" }))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                settings.request_timeout,
            ));
        tracing::info!(%listen, "ceiling server serving HTTPS");
        // Runs until the benchmark kills it (SIGTERM's default action ends it too).
        let shutdown = std::future::pending::<()>();
        Server::bind(listen)?
            .serve_router(app, kips::tls::server_config(store)?, settings, shutdown)
            .await
    })
}

async fn fixed_answer(body: Body, answer: Bytes) -> Response {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer,
        )
            .into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}
