//! The soak: `kips webhook` serving certificate files (`--cert-mode files`) that rotate by a
//! Secret volume's `..data` symlink swap every `rotate_every`, at a fixed rate of mixed pods
//! and workloads over HTTP/2 for minutes, with latency and errors per minute and the
//! process's VmRSS sampled every few seconds.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use kips::tls::{PemPair, generate_ca, issue_serving_cert, local_names};

use crate::client::{self, Measured, Protocol, Target};
use crate::common;
use crate::servers::{self, Role, ServerProcess};

/// What a soak runs.
#[derive(Debug, Clone)]
pub struct SoakSettings {
    pub duration: Duration,
    pub warmup: Duration,
    pub rate: u64,
    pub rotate_every: Duration,
    pub connections: usize,
    pub recycle_every: Duration,
    /// Latency and errors are reported per window.
    pub window: Duration,
    /// How often VmRSS is read.
    pub rss_every: Duration,
    pub server_core: usize,
}

/// The bodies, sent in turn: pods and workloads (Deployment UPDATEs), two sizes each.
pub const BODIES: [(&str, &str); 4] = [
    ("pod", "typical"),
    ("deployment", "typical"),
    ("pod", "small"),
    ("deployment", "small"),
];

pub struct SoakReport {
    pub settings: SoakSettings,
    pub measured: Measured,
    /// HTTP/2 connections replaced by new ones during the run.
    pub recycled: usize,
    /// Certificate pairs published, and reloads the server logged.
    pub rotations: usize,
    pub reloads: usize,
    /// (time since the measured start, VmRSS KiB); negative times are the warm-up.
    pub rss: Vec<(f64, u64)>,
    pub peak_kib: u64,
    pub server_cpu: f64,
}

/// Writes `pair` into `dir/<version>/` and points `dir/..data` at it atomically, as the
/// kubelet updates a Secret volume; `tls.crt` and `tls.key` link through `..data`.
fn publish(dir: &Path, version: &str, pair: &PemPair) -> Result<()> {
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

/// Publishes a new serving pair (same CA) every `every`, removing the previous version as
/// the kubelet does, until stopped.
struct Rotation {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Rotation {
    fn start(volume: &Path, ca: PemPair, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (flag, counter, volume) = (stop.clone(), count.clone(), volume.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now() + every;
            while !flag.load(Ordering::Relaxed) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                next += every;
                let version = counter.load(Ordering::Relaxed) + 1;
                let pair = issue_serving_cert(&ca, &local_names(&[]), Duration::from_secs(3600))?;
                publish(&volume, &format!("..{version}"), &pair)?;
                std::fs::remove_dir_all(volume.join(format!("..{}", version - 1)))?;
                counter.store(version, Ordering::Relaxed);
            }
            Ok(())
        });
        Self {
            stop,
            count,
            thread,
        }
    }

    fn stop(self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the rotation thread panicked"))??;
        Ok(self.count.load(Ordering::Relaxed))
    }
}

/// Reads a process's VmRSS every `every` on a thread of its own.
struct RssSeries {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, u64)>>,
}

impl RssSeries {
    fn start(pid: u32, every: Duration, zero: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now >= next {
                    let at = now.saturating_duration_since(zero).as_secs_f64()
                        - zero.saturating_duration_since(now).as_secs_f64();
                    samples.push((at, servers::memory_kib(pid).0));
                    next += every;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

pub async fn run(settings: &SoakSettings, kips: &Path) -> Result<SoakReport> {
    let volume = tempfile::Builder::new().prefix("kips-soak-").tempdir()?;
    let validity = Duration::from_secs(24 * 3600);
    let ca = generate_ca("kips soak CA", validity)?;
    publish(
        volume.path(),
        "..0",
        &issue_serving_cert(&ca, &local_names(&[]), validity)?,
    )?;
    let flags = [
        "--cert-mode=files".to_owned(),
        format!("--tls-cert={}", volume.path().join("tls.crt").display()),
        format!("--tls-key={}", volume.path().join("tls.key").display()),
    ];
    let server = ServerProcess::start_with(
        Role::Kips,
        kips,
        settings.server_core,
        &flags,
        Some(ca.cert.clone()),
    )?;
    let mut targets = Vec::new();
    for (kind, size) in BODIES {
        let body = Bytes::from(common::fixture(kind, size).body);
        let mut target = Target::new(server.port, Protocol::Http2, &ca.cert, body)?;
        target.answer_len = client::check(&target)
            .await
            .with_context(|| format!("kips did not patch {kind}-{size}"))?;
        targets.push(target);
    }
    let rotation = Rotation::start(volume.path(), ca, settings.rotate_every);
    let measure_from = Instant::now() + settings.warmup;
    let rss = RssSeries::start(server.pid(), settings.rss_every, measure_from);
    let cpu_before = server.cpu_time();
    let started = Instant::now();
    let soaked = client::soak(
        &targets,
        settings.connections,
        settings.rate,
        settings.warmup,
        settings.duration,
        settings.window,
        settings.recycle_every,
    )
    .await;
    let server_cpu =
        (server.cpu_time() - cpu_before).as_secs_f64() / started.elapsed().as_secs_f64();
    let rss = rss.stop();
    let rotations = rotation.stop()?;
    // The last swap may be a moment old: let the server's watcher see it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (measured, recycled) = soaked?;
    let reloads = server.log().matches("serving certificate reloaded").count();
    Ok(SoakReport {
        settings: settings.clone(),
        measured,
        recycled,
        rotations,
        reloads,
        rss,
        peak_kib: server.memory_kib().1,
        server_cpu,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

impl SoakReport {
    /// The sample nearest to `at` seconds after the measured start.
    fn rss_at(&self, at: f64) -> u64 {
        self.rss
            .iter()
            .min_by(|a, b| (a.0 - at).abs().total_cmp(&(b.0 - at).abs()))
            .map_or(0, |s| s.1)
    }

    /// When the flatness window starts: minute 2 of 10 (a fifth of the run).
    fn settled_at(&self) -> f64 {
        self.settings.duration.as_secs_f64() / 5.0
    }

    /// (VmRSS when settled, at the end, the highest after settling, growth after settling).
    pub fn rss_figures(&self) -> (u64, u64, u64, f64) {
        let settled_at = self.settled_at();
        let settled = self.rss_at(settled_at);
        let end = self.rss_at(self.settings.duration.as_secs_f64());
        let highest = self
            .rss
            .iter()
            .filter(|s| s.0 >= settled_at && s.0 <= self.settings.duration.as_secs_f64())
            .map(|s| s.1)
            .max()
            .unwrap_or(0);
        let growth = highest as f64 / settled.max(1) as f64 - 1.0;
        (settled, end, highest, growth)
    }

    pub fn print(&self) {
        let s = &self.settings;
        let m = &self.measured;
        println!(
            "\n## Soak: {} req/s of mixed pods and workloads over HTTP/2, {} s, certificate rotation every {} s\n",
            s.rate,
            s.duration.as_secs(),
            s.rotate_every.as_secs_f64()
        );
        let bodies: Vec<String> = BODIES.iter().map(|(k, z)| format!("{k}-{z}")).collect();
        println!(
            "Bodies in turn: {}; {} connections, one replaced every {} s; latency from each request's scheduled time, µs.\n",
            bodies.join(", "),
            s.connections,
            s.recycle_every.as_secs_f64()
        );
        println!(
            "| window | requests | errors | p50 µs | p99 µs | p99.9 µs | max µs | VmRSS at end MiB |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        let window = s.window.as_secs_f64();
        for (index, w) in m.windows.iter().enumerate() {
            let end = (index + 1) as f64 * window;
            println!(
                "| {:.0}–{:.0} s | {} | {} | {} | {} | {} | {} | {} |",
                index as f64 * window,
                end,
                w.ok + w.errors,
                w.errors,
                w.latency.value_at_quantile(0.5),
                w.latency.value_at_quantile(0.99),
                w.latency.value_at_quantile(0.999),
                w.latency.max(),
                mib(self.rss_at(end))
            );
        }
        println!(
            "| **all** | {} | {} | {} | {} | {} | {} | |",
            m.ok + m.errors,
            m.errors,
            m.percentile(0.5),
            m.percentile(0.99),
            m.percentile(0.999),
            m.latency.max()
        );
        let (settled, end, highest, growth) = self.rss_figures();
        println!(
            "\n- throughput {:.0} req/s (scheduled {}); send lag p99 {} µs; server CPU {:.0}% of its core",
            m.throughput(),
            m.scheduled,
            m.send_lag.value_at_quantile(0.99),
            self.server_cpu * 100.0
        );
        println!(
            "- certificate rotations: {} published, {} reloads logged by kips; {} connections replaced (new handshakes)",
            self.rotations, self.reloads, self.recycled
        );
        if let Some(error) = &m.first_error {
            println!("- first error: {error}");
        }
        println!(
            "- VmRSS: {} MiB at {:.0} s, {} MiB at the end, highest after {:.0} s {} MiB ({:+.1}%); VmHWM {} MiB; {} samples, every {} s",
            mib(settled),
            self.settled_at(),
            mib(end),
            self.settled_at(),
            mib(highest),
            growth * 100.0,
            mib(self.peak_kib),
            self.rss.len(),
            s.rss_every.as_secs_f64()
        );
        let verdict = |met: bool| if met { "met" } else { "MISSED" };
        println!("\n## Targets (soak)\n");
        println!(
            "- errors = {} (target 0): {}",
            m.errors,
            verdict(m.errors == 0)
        );
        println!(
            "- p99 = {} µs (target < 2000 µs): {}",
            m.percentile(0.99),
            verdict(m.percentile(0.99) < 2000)
        );
        println!(
            "- VmRSS growth after {:.0} s = {:+.1}% (target ≤ +10%): {}",
            self.settled_at(),
            growth * 100.0,
            verdict(growth <= 0.10)
        );
        println!(
            "- every rotation reloaded: {} of {}: {}",
            self.reloads,
            self.rotations,
            verdict(self.reloads == self.rotations && self.rotations > 0)
        );
    }
}
