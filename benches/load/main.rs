//! Load benchmark: `kips webhook` (the release binary) beside a ceiling server on the same
//! HTTPS stack, driven by the same client, plus cold start. Prints Markdown tables.
//!
//!     cargo bench --bench load -- [--duration 5] [--sizes typical] [--protocols h2] ...
//!
//! The servers run pinned to one core and the client (this process) to the other, so that
//! on a 2-core machine neither steals the other's CPU; kips and the ceiling take turns,
//! each run with fresh connections, alternating which goes first.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod servers;
mod soak;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use clap::{Parser, Subcommand};

use client::{Measured, Protocol, Target};
use servers::{Role, ServerProcess};

#[derive(Debug, Parser)]
#[command(about = "kips load benchmark: kips vs the TLS ceiling, and cold start")]
struct Args {
    #[command(subcommand)]
    role: Option<Sub>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unmeasured seconds before each run (connections warm, allocator settled).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Pod sizes (benches/fixtures/pod-<size>.json).
    #[arg(long, value_delimiter = ',', default_value = "small,typical,large")]
    sizes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "h1,h2")]
    protocols: Vec<String>,
    /// Open-loop rates, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
    rates: Vec<u64>,
    /// HTTP/1.1 connections, and the closed loop's concurrency (HTTP/2: streams on one
    /// connection).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Cold starts to time (0: none).
    #[arg(long, default_value_t = 40)]
    cold_starts: usize,
    /// Skip the load runs (cold start only).
    #[arg(long)]
    no_load: bool,
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// Run the soak instead (only it): a fixed rate of mixed pods and workloads over HTTP/2
    /// against `--cert-mode files` certificates rotated by symlink swap.
    #[arg(long)]
    soak: bool,
    /// Measured seconds of the soak.
    #[arg(long, default_value_t = 600.0)]
    soak_duration: f64,
    /// Requests per second of the soak.
    #[arg(long, default_value_t = 5000)]
    soak_rate: u64,
    /// Seconds between certificate rotations in the soak.
    #[arg(long, default_value_t = 60.0)]
    rotate_every: f64,
    /// HTTP/2 connections of the soak (streams spread over them in turn).
    #[arg(long, default_value_t = 4)]
    soak_connections: usize,
    /// Seconds between replacing one soak connection by a new one (a new handshake).
    #[arg(long, default_value_t = 15.0)]
    recycle_every: f64,
    /// Seconds per row of the soak's table.
    #[arg(long, default_value_t = 60.0)]
    soak_window: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// The ceiling server (started by the benchmark itself).
    CeilingServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        certs_dir: PathBuf,
    },
    /// Sends `count` reviews one after another to a running server (for profiling it).
    Drive {
        #[arg(long)]
        port: u16,
        /// The CA file the server wrote.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value = "h2")]
        protocol: String,
        #[arg(long, default_value = "typical")]
        size: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum Load {
    Max,
    Rate(u64),
}

impl Load {
    fn label(self) -> String {
        match self {
            Load::Max => "max (closed)".into(),
            Load::Rate(rate) => format!("{rate}/s (open)"),
        }
    }
}

/// One server's run.
struct Run {
    measured: Measured,
    server_cpu: f64,
    client_cpu: f64,
    rss_median_kib: u64,
    rss_max_kib: u64,
}

struct Row {
    size: String,
    protocol: Protocol,
    load: Load,
    kips: Run,
    ceiling: Run,
}

struct SizeMemory {
    size: String,
    idle_kib: u64,
    peak_at_max_kib: u64,
    peak_overall_kib: u64,
    ceiling_peak_kib: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.role {
        Some(Sub::CeilingServer { listen, certs_dir }) => {
            return servers::run_ceiling(listen, certs_dir);
        }
        Some(Sub::Drive {
            port,
            ca,
            protocol: ref name,
            ref size,
            count,
        }) => {
            let body = Bytes::from(common::fixture("pod", size).body);
            let target = Target::new(port, protocol(name)?, &std::fs::read_to_string(ca)?, body)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(async {
                let connection = client::connect(&target).await?;
                for _ in 0..count {
                    client::send(&connection, &target).await?;
                }
                println!("sent {count} reviews of pod-{size}");
                Ok(())
            });
        }
        None => {}
    }
    if !args.bench {
        // `cargo test --all-targets` runs this target without `--bench`: check that the
        // benchmark's parts work (both servers answer every body over both protocols)
        // instead of measuring.
        return smoke_test(&PathBuf::from(env!("CARGO_BIN_EXE_kips")));
    }
    servers::pin_to_core(args.client_core).context("pinning the client")?;
    let kips = PathBuf::from(env!("CARGO_BIN_EXE_kips"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("# kips load benchmark\n");
    println!(
        "server core {}, client core {}; load average before: {}",
        args.server_core,
        args.client_core,
        load_average()
    );
    if args.soak {
        let settings = soak::SoakSettings {
            duration: Duration::from_secs_f64(args.soak_duration),
            warmup: Duration::from_secs_f64(args.warmup),
            rate: args.soak_rate,
            rotate_every: Duration::from_secs_f64(args.rotate_every),
            connections: args.soak_connections,
            recycle_every: Duration::from_secs_f64(args.recycle_every),
            window: Duration::from_secs_f64(args.soak_window),
            rss_every: Duration::from_secs(5),
            server_core: args.server_core,
        };
        eprintln!("[soak {} s at {}/s]", args.soak_duration, args.soak_rate);
        runtime.block_on(soak::run(&settings, &kips))?.print();
        println!("\nload average after: {}", load_average());
        return Ok(());
    }
    if !args.no_load {
        let (rows, memory) = runtime.block_on(load(&args, &kips))?;
        print_rows(&rows);
        print_memory(&memory);
        print_load_targets(&rows, &memory);
    }
    if args.cold_starts > 0 {
        let cold = runtime.block_on(cold_start(&args, &kips))?;
        print_cold_start(&cold);
    }
    println!("\nload average after: {}", load_average());
    Ok(())
}

fn smoke_test(kips: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for role in [Role::Kips, Role::Ceiling] {
            let server = ServerProcess::start(role, kips, 0)?;
            for size in common::SIZES {
                let body = Bytes::from(common::fixture("pod", size).body);
                for protocol in [Protocol::Http1, Protocol::Http2] {
                    let target = Target::new(server.port, protocol, &server.ca_pem, body.clone())?;
                    let answer_len = client::check(&target).await.with_context(|| {
                        format!("{} on pod-{size} over {}", role.name(), protocol.name())
                    })?;
                    let connection = client::connect(&target).await?;
                    for _ in 0..20 {
                        let len = client::send(&connection, &target).await?;
                        anyhow::ensure!(len == answer_len, "{} answered differently", role.name());
                    }
                    println!(
                        "load bench smoke test: {} answered pod-{size} over {} ({answer_len} bytes)",
                        role.name(),
                        protocol.name()
                    );
                }
            }
        }
        // The soak's parts: rotation, recycled connections, windows, memory samples.
        let settings = soak::SoakSettings {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(200),
            rate: 200,
            rotate_every: Duration::from_millis(500),
            connections: 2,
            recycle_every: Duration::from_millis(300),
            window: Duration::from_secs(1),
            rss_every: Duration::from_millis(250),
            server_core: 0,
        };
        let report = soak::run(&settings, kips).await?;
        let m = &report.measured;
        anyhow::ensure!(
            m.errors == 0 && m.ok > 0,
            "soak smoke test: {} errors ({:?})",
            m.errors,
            m.first_error
        );
        anyhow::ensure!(
            report.rotations >= 2 && report.reloads == report.rotations,
            "soak smoke test: {} rotations, {} reloads",
            report.rotations,
            report.reloads
        );
        anyhow::ensure!(report.recycled >= 2 && m.windows.len() == 2 && report.rss.len() >= 4);
        println!(
            "load bench smoke test: soak of {} requests, {} rotations reloaded, {} connections replaced",
            m.ok, report.reloads, report.recycled
        );
        Ok(())
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn protocol(name: &str) -> Result<Protocol> {
    match name {
        "h1" => Ok(Protocol::Http1),
        "h2" => Ok(Protocol::Http2),
        other => anyhow::bail!("unknown protocol {other} (h1, h2)"),
    }
}

async fn load(args: &Args, kips: &Path) -> Result<(Vec<Row>, Vec<SizeMemory>)> {
    let protocols: Vec<Protocol> = args
        .protocols
        .iter()
        .map(|p| protocol(p))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    let mut memory = Vec::new();
    let mut turn = 0usize;
    for size in &args.sizes {
        let path = common::fixtures_dir().join(format!("pod-{size}.json"));
        let body = Bytes::from(std::fs::read(&path).with_context(|| path.display().to_string())?);
        // Fresh processes per size, so each size's peak memory is its own.
        let kips_server = ServerProcess::start(Role::Kips, kips, args.server_core)?;
        let ceiling = ServerProcess::start(Role::Ceiling, kips, args.server_core)?;
        let idle_kib = kips_server.memory_kib().0;
        let mut phases: Vec<(Protocol, Load)> = protocols.iter().map(|p| (*p, Load::Max)).collect();
        let max_phases = phases.len();
        for protocol in &protocols {
            phases.extend(args.rates.iter().map(|rate| (*protocol, Load::Rate(*rate))));
        }
        let mut peak_at_max_kib = 0;
        for (index, (protocol, load)) in phases.into_iter().enumerate() {
            eprintln!("[{size} {} {}]", protocol.name(), load.label());
            let servers = [&kips_server, &ceiling];
            let order = if turn.is_multiple_of(2) {
                [1, 0]
            } else {
                [0, 1]
            };
            turn += 1;
            let mut runs: [Option<Run>; 2] = [None, None];
            for which in order {
                let server = servers[which];
                runs[which] = Some(run(args, server, protocol, load, body.clone()).await?);
            }
            let [kips_run, ceiling_run] = runs.map(|r| r.expect("both servers ran"));
            for (name, run) in [("kips", &kips_run), ("ceiling", &ceiling_run)] {
                let m = &run.measured;
                eprintln!(
                    "  {name:<7} {:>8.0} req/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  errors {}{}  server CPU {:.0}%  client CPU {:.0}%  send lag p99 {} µs",
                    m.throughput(),
                    m.percentile(0.5),
                    m.percentile(0.99),
                    m.percentile(0.999),
                    m.errors,
                    m.first_error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default(),
                    run.server_cpu * 100.0,
                    run.client_cpu * 100.0,
                    m.send_lag.value_at_quantile(0.99),
                );
            }
            rows.push(Row {
                size: size.clone(),
                protocol,
                load,
                kips: kips_run,
                ceiling: ceiling_run,
            });
            if index + 1 == max_phases {
                peak_at_max_kib = kips_server.memory_kib().1;
            }
        }
        memory.push(SizeMemory {
            size: size.clone(),
            idle_kib,
            peak_at_max_kib,
            peak_overall_kib: kips_server.memory_kib().1,
            ceiling_peak_kib: ceiling.memory_kib().1,
        });
    }
    Ok((rows, memory))
}

async fn run(
    args: &Args,
    server: &ServerProcess,
    protocol: Protocol,
    load: Load,
    body: Bytes,
) -> Result<Run> {
    let mut target = Target::new(server.port, protocol, &server.ca_pem, body)?;
    target.answer_len = client::check(&target)
        .await
        .with_context(|| format!("{} did not answer the review", server.role.name()))?;
    let sampler = RssSampler::start(server.pid());
    let (server_cpu, client_cpu) = (server.cpu_time(), servers::own_cpu_time());
    let started = Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let measured = match load {
        Load::Max => client::closed_loop(&target, args.connections, warmup, duration).await?,
        Load::Rate(rate) => {
            client::open_loop(&target, args.connections, rate, warmup, duration).await?
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = (server.cpu_time() - server_cpu).as_secs_f64() / elapsed;
    let client_cpu = (servers::own_cpu_time() - client_cpu).as_secs_f64() / elapsed;
    let mut samples = sampler.stop();
    samples.sort_unstable();
    Ok(Run {
        measured,
        server_cpu,
        client_cpu,
        rss_median_kib: samples.get(samples.len() / 2).copied().unwrap_or(0),
        rss_max_kib: samples.last().copied().unwrap_or(0),
    })
}

/// Samples a process's VmRSS every 50 ms on a thread of its own.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                samples.push(servers::memory_kib(pid).0);
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn latencies(m: &Measured) -> String {
    format!(
        "{} / {} / {}",
        m.percentile(0.5),
        m.percentile(0.99),
        m.percentile(0.999)
    )
}

fn over_capacity(row_load: Load, m: &Measured) -> bool {
    matches!(row_load, Load::Rate(rate) if m.throughput() < 0.97 * rate as f64)
}

fn print_rows(rows: &[Row]) {
    println!("\n## Throughput and latency (kips vs ceiling, same client)\n");
    println!(
        "| pod | proto | load | kips req/s | ceiling req/s | kips/ceiling | kips p50 / p99 / p99.9 µs | ceiling p50 / p99 / p99.9 µs | errors kips / ceiling | server CPU kips / ceiling | client CPU kips / ceiling run | kips RSS median / max MiB |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let (k, c) = (&row.kips.measured, &row.ceiling.measured);
        let mark = |m: &Measured| {
            if over_capacity(row.load, m) {
                " (over capacity)"
            } else {
                ""
            }
        };
        println!(
            "| {} | {} | {} | {:.0}{} | {:.0}{} | {:.2} | {} | {} | {} / {} | {:.0}% / {:.0}% | {:.0}% / {:.0}% | {} / {} |",
            row.size,
            row.protocol.name(),
            row.load.label(),
            k.throughput(),
            mark(k),
            c.throughput(),
            mark(c),
            k.throughput() / c.throughput(),
            latencies(k),
            latencies(c),
            k.errors,
            c.errors,
            row.kips.server_cpu * 100.0,
            row.ceiling.server_cpu * 100.0,
            row.kips.client_cpu * 100.0,
            row.ceiling.client_cpu * 100.0,
            mib(row.kips.rss_median_kib),
            mib(row.kips.rss_max_kib),
        );
    }
}

fn print_memory(memory: &[SizeMemory]) {
    println!("\n## kips webhook memory (/proc/<pid>/status, one fresh process per pod size)\n");
    println!(
        "| pod | idle VmRSS MiB | VmHWM after max load MiB | VmHWM after all runs MiB | ceiling VmHWM MiB |"
    );
    println!("|---|---:|---:|---:|---:|");
    for m in memory {
        println!(
            "| {} | {} | {} | {} | {} |",
            m.size,
            mib(m.idle_kib),
            mib(m.peak_at_max_kib),
            mib(m.peak_overall_kib),
            mib(m.ceiling_peak_kib)
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn print_load_targets(rows: &[Row], memory: &[SizeMemory]) {
    println!("\n## Targets (load)\n");
    for row in rows.iter().filter(|r| r.size == "typical") {
        let (k, c) = (&row.kips.measured, &row.ceiling.measured);
        match row.load {
            Load::Max => {
                let ratio = k.throughput() / c.throughput();
                println!(
                    "- typical, {}, max: kips/ceiling = {ratio:.2} (target ≥ 0.85): {}",
                    row.protocol.name(),
                    verdict(ratio >= 0.85)
                );
            }
            Load::Rate(rate) => {
                if rate == 2000 {
                    let p99 = k.percentile(0.99);
                    println!(
                        "- typical, {}, 2000/s: kips p99 = {p99} µs (target ≤ 1000 µs): {}",
                        row.protocol.name(),
                        verdict(p99 <= 1000)
                    );
                }
                println!(
                    "- typical, {}, {rate}/s: kips errors = {} (target 0): {}",
                    row.protocol.name(),
                    k.errors,
                    verdict(k.errors == 0)
                );
            }
        }
    }
    for m in memory {
        println!(
            "- {}: kips VmHWM under max load = {} MiB (target ≤ 25 MiB): {}",
            m.size,
            mib(m.peak_at_max_kib),
            verdict(m.peak_at_max_kib <= 25 * 1024)
        );
    }
}

/// Cold start: from spawning `kips webhook` (embedded default: rcgen CA and certificate) to
/// its first 200 on `/mutate` with the typical review, polled every 200 µs.
struct ColdStart {
    ca_written: Vec<Duration>,
    first_admission: Vec<Duration>,
}

async fn cold_start(args: &Args, kips: &Path) -> Result<ColdStart> {
    let body = Bytes::from(common::fixture("pod", "typical").body);
    let mut result = ColdStart {
        ca_written: Vec::new(),
        first_admission: Vec::new(),
    };
    for _ in 0..args.cold_starts {
        let dir = tempfile::Builder::new().prefix("kips-cold-").tempdir()?;
        let certs = dir.path().join("certs");
        let ca_path = certs.join("ca.crt");
        let port = servers::free_port()?;
        let mut command = servers::command(Role::Kips, kips, port, &certs, args.server_core);
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let started = Instant::now();
        let mut child = KillOnDrop(command.spawn()?);
        let mut target: Option<Target> = None;
        loop {
            if started.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("kips webhook did not admit within 10 s of starting");
            }
            if let Some(status) = child.0.try_wait()? {
                anyhow::bail!("kips webhook exited with {status} during cold start");
            }
            match &target {
                None => {
                    if let Ok(ca) = std::fs::read_to_string(&ca_path) {
                        result.ca_written.push(started.elapsed());
                        target = Some(Target::new(port, Protocol::Http1, &ca, body.clone())?);
                    }
                }
                Some(target) => {
                    if client::check(target).await.is_ok() {
                        result.first_admission.push(started.elapsed());
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        drop(child);
    }
    Ok(result)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn print_cold_start(cold: &ColdStart) {
    println!(
        "\n## Cold start: process spawn → first 200 on /mutate (embedded default, {} runs)\n",
        cold.first_admission.len()
    );
    println!("| milestone | min ms | median ms | p90 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    for (name, samples) in [
        (
            "ca.crt written (CA + certificate generated)",
            &cold.ca_written,
        ),
        ("first admission answered", &cold.first_admission),
    ] {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(sorted[0]),
            ms(quantile(&sorted, 0.5)),
            ms(quantile(&sorted, 0.9)),
            ms(*sorted.last().expect("at least one run"))
        );
    }
    let mut sorted = cold.first_admission.clone();
    sorted.sort_unstable();
    let median = quantile(&sorted, 0.5);
    println!(
        "\n- ready (median) = {} ms (target ≤ 150 ms): {}",
        ms(median),
        verdict(median <= Duration::from_millis(150))
    );
}
