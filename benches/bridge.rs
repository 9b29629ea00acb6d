//! Relay bridge benchmark: `kips bridge -L` → `kips relay` → `kips bridge -T` on loopback
//! (the release binary, TLS on both relay legs), beside a direct TCP connection measured
//! in the same run with the same client and servers. Prints Markdown tables.
//!
//!     cargo bench --bench bridge -- --bench [--bytes 1073741824] [--streams 1000]
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke test: every
//! measurement once, small, checking the bytes, with no figures to publish.

#[path = "../tests/support/bridge.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Options {
    bench: bool,
    /// Bytes per throughput run.
    bytes: usize,
    /// Open streams for the memory figure.
    streams: usize,
    /// Connection setups and round trips sampled.
    samples: usize,
    /// Runs per throughput figure (the median is reported).
    runs: usize,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let bench = args.iter().any(|a| a == "--bench");
    Options {
        bench,
        bytes: value("--bytes").unwrap_or(if bench { 1 << 30 } else { 4 << 20 }),
        streams: value("--streams").unwrap_or(if bench { 1000 } else { 50 }),
        samples: value("--samples").unwrap_or(if bench { 1000 } else { 20 }),
        runs: value("--runs").unwrap_or(if bench { 3 } else { 1 }),
    }
}

/// Reads a connection to its end, then answers with the count (8 bytes) and closes.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("sink");
    let address = listener.local_addr().expect("sink address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = stream.write_all(&total.to_be_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    address
}

/// Sends as many bytes as the 8-byte big-endian count the client writes first, then closes.
async fn source() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("source");
    let address = listener.local_addr().expect("source address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut count = [0u8; 8];
                if stream.read_exact(&mut count).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(count) as usize;
                let chunk = vec![0x42u8; 256 * 1024];
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    address
}

/// Uploads `bytes` and waits for the sink's count: seconds from connect to the answer.
async fn upload(address: SocketAddr, bytes: usize) -> Result<f64> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let chunk = vec![0x17u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).await?;
        left -= n;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .context("the sink's count")?;
    ensure!(
        u64::from_be_bytes(count) as usize == bytes,
        "the sink counted {} of {bytes}",
        u64::from_be_bytes(count)
    );
    Ok(started.elapsed().as_secs_f64())
}

/// Downloads `bytes` from the source: seconds from connect to the end.
async fn download(address: SocketAddr, bytes: usize) -> Result<f64> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&(bytes as u64).to_be_bytes()).await?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        total += n;
    }
    ensure!(total == bytes, "received {total} of {bytes}");
    Ok(started.elapsed().as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

/// Median MB/s (10^6 bytes) of `runs` transfers of `bytes` over `streams` parallel streams.
async fn throughput(
    address: SocketAddr,
    bytes: usize,
    streams: usize,
    runs: usize,
    up: bool,
) -> Result<f64> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let per_stream = bytes / streams;
        let mut transfers = Vec::new();
        for _ in 0..streams {
            transfers.push(tokio::spawn(async move {
                if up {
                    upload(address, per_stream).await
                } else {
                    download(address, per_stream).await
                }
            }));
        }
        for transfer in transfers {
            transfer.await??;
        }
        rates.push((per_stream * streams) as f64 / started.elapsed().as_secs_f64() / 1e6);
    }
    Ok(median(&mut rates))
}

/// Connection setup: connect, send one byte, read its echo (µs per sample).
async fn setups(address: SocketAddr, samples: usize) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        let mut stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        stream.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

/// Round trips of one byte on one open connection (µs per sample).
async fn round_trips(address: SocketAddr, samples: usize) -> Result<Vec<f64>> {
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    for _ in 0..20 {
        stream.write_all(b"w").await?;
        stream.read_exact(&mut byte).await?;
    }
    let mut times = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        stream.write_all(b"p").await?;
        stream.read_exact(&mut byte).await?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

/// A process's memory from /proc/<pid>/status, in MiB.
#[derive(Clone, Copy)]
struct Memory {
    rss: f64,
    anon: f64,
    file: f64,
    peak: f64,
}

fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    Memory {
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
        peak: field("VmHWM:"),
    }
}

fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> Result<()> {
    let options = options();
    raise_open_files();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> Result<()> {
    let dir = temp_dir("bridge-bench-");
    let relay = Relay::start(dir.path(), &["bench"], &[]).await?;
    let (sink, source, echo) = (sink().await, source().await, echo_server().await);
    let ports = [free_port(), free_port(), free_port()];
    let info = ("KIPS_LOG", "warn".to_owned());
    let remote_args = [
        "bridge".to_owned(),
        "-x".into(),
        relay.connection_string(),
        format!("--relay-ca={}", relay.ca().display()),
        "-T".into(),
        format!("bench:sink/{sink};source/{source};echo/{echo}"),
    ];
    let local_args = [
        "bridge".to_owned(),
        "-x".into(),
        relay.connection_string(),
        format!("--relay-ca={}", relay.ca().display()),
        "-L".into(),
        format!(
            "127.0.0.1:{}/sink;127.0.0.1:{}/source;127.0.0.1:{}/echo:bench",
            ports[0], ports[1], ports[2]
        ),
    ];
    let remote = Process::spawn(
        "remote",
        KIPS,
        &remote_args,
        std::slice::from_ref(&info),
        dir.path(),
    )?;
    let local = Process::spawn("local", KIPS, &local_args, &[info], dir.path())?;
    let bridged = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    // Ready when an echo comes back through the bridges.
    eventually(
        "the bridges carry a connection",
        Duration::from_secs(20),
        || async {
            let mut stream = TcpStream::connect(bridged(2)).await.ok()?;
            stream.write_all(b"r").await.ok()?;
            let mut byte = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut byte))
                .await
                .ok()?
                .ok()?;
            Some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = [
        ("kips bridge -L", local.pid().context("-L pid")?),
        ("kips bridge -T", remote.pid().context("-T pid")?),
        ("kips relay", relay_pid(&relay)?),
    ];
    let idle: Vec<Memory> = pids.iter().map(|(_, pid)| memory(*pid)).collect();

    println!("# kips bridge benchmark\n");
    println!("load average before: {}", load_average());
    println!(
        "\n## Throughput (MB/s = 10^6 bytes/s; median of {} runs of {} bytes)\n",
        options.runs, options.bytes
    );
    println!("| streams | direction | direct MB/s | bridge MB/s | bridge Gbit/s | bridge/direct |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut single_gbit = 0.0;
    for streams in [1usize, 64] {
        for (up, name) in [(true, "to target"), (false, "from target")] {
            let (direct_target, bridged_port) = if up {
                (sink, bridged(0))
            } else {
                (source, bridged(1))
            };
            let direct =
                throughput(direct_target, options.bytes, streams, options.runs, up).await?;
            let through =
                throughput(bridged_port, options.bytes, streams, options.runs, up).await?;
            let gbit = through * 8.0 / 1000.0;
            if streams == 1 && up {
                single_gbit = gbit;
            }
            println!(
                "| {streams} | {name} | {direct:.0} | {through:.0} | {gbit:.2} | {:.2} |",
                through / direct
            );
        }
    }

    println!("\n## Latency ({} samples each; µs)\n", options.samples);
    println!("| what | direct p50 / p99 | bridge p50 / p99 | added p50 |");
    println!("|---|---:|---:|---:|");
    let mut direct = setups(echo, options.samples).await?;
    let mut through = setups(bridged(2), options.samples).await?;
    let (d50, d99, b50, b99) = (
        median(&mut direct),
        percentile(&mut direct, 0.99),
        median(&mut through),
        percentile(&mut through, 0.99),
    );
    println!(
        "| connection setup (connect + first byte echoed) | {d50:.0} / {d99:.0} | {b50:.0} / {b99:.0} | {:.0} |",
        b50 - d50
    );
    let mut direct = round_trips(echo, options.samples).await?;
    let mut through = round_trips(bridged(2), options.samples).await?;
    let (d50, d99, b50, b99) = (
        median(&mut direct),
        percentile(&mut direct, 0.99),
        median(&mut through),
        percentile(&mut through, 0.99),
    );
    println!(
        "| round trip of 1 byte on an open connection | {d50:.0} / {d99:.0} | {b50:.0} / {b99:.0} | {:.0} |",
        b50 - d50
    );

    // Memory with many open streams: each carried one echo, then stays open, idle.
    let mut open = Vec::with_capacity(options.streams);
    for _ in 0..options.streams {
        let mut stream = TcpStream::connect(bridged(2)).await?;
        stream.write_all(b"o").await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        open.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded: Vec<Memory> = pids.iter().map(|(_, pid)| memory(*pid)).collect();
    // Every stream still works.
    for stream in open.iter_mut().step_by((options.streams / 20).max(1)) {
        stream.write_all(b"z").await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        ensure!(&byte == b"z", "an open stream stopped carrying");
    }
    println!("\n## Memory (MiB: VmRSS = RssAnon + RssFile (+ shmem); VmHWM = peak over the run)\n");
    println!(
        "| process | idle VmRSS (anon + file) | {n} open streams VmRSS (anon + file) | VmHWM over the run |",
        n = options.streams
    );
    println!("|---|---:|---:|---:|");
    for (((name, _), idle), loaded) in pids.iter().zip(&idle).zip(&loaded) {
        println!(
            "| {name} | {:.1} ({:.1} + {:.1}) | {:.1} ({:.1} + {:.1}) | {:.1} |",
            idle.rss, idle.anon, idle.file, loaded.rss, loaded.anon, loaded.file, loaded.peak
        );
    }
    drop(open);

    println!("\n## Targets\n");
    println!("| target | measured |");
    println!("|---|---|");
    println!("| one stream ≥ 1 Gbit/s | {single_gbit:.2} Gbit/s (to target) |");
    let worst_loaded = loaded[..2].iter().map(|m| m.rss).fold(0.0, f64::max);
    let worst_idle = idle[..2].iter().map(|m| m.rss).fold(0.0, f64::max);
    println!(
        "| {} streams ≤ 64 MiB (per bridge process) | {worst_loaded:.1} MiB |",
        options.streams
    );
    println!("| idle ≤ 10 MiB (per bridge process) | {worst_idle:.1} MiB |");
    println!("\nload average after: {}", load_average());
    if !options.bench {
        println!("\n(smoke run: sizes reduced, figures not for publishing)");
    }
    Ok(())
}

fn relay_pid(relay: &Relay) -> Result<u32> {
    relay.pid().context("relay pid")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
