//! `kips bridge` under faults with 1,000 streams open: `-L` ↔ `kips relay` ↔ `-T`, as real
//! processes on loopback. The relay is killed (SIGKILL) with 1,000 streams in flight, then
//! restarted; the listener (`-T`) is killed with 1,000 streams in flight, then started again.
//! Each time every stream ends (reset or EOF, never a hang), new streams work again once the
//! relay or the listener is back, and the `-L` bridge gives back what the streams took (at
//! least three quarters of it; the rest is the allocator's fragmentation and the runtime's
//! slabs, and a second thousand streams leave no more behind than the first).

#[path = "support/bridge.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAMS: usize = 1000;
/// How long a stream may take to end once its path is gone: the relay's death closes its
/// sockets at once; a listener's death is seen by the relay at once too. Generous for a
/// loaded 2-core machine; a hang is what this catches.
const END_LIMIT: Duration = Duration::from_secs(30);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The anonymous resident memory of `pid` in KiB (`RssAnon`: heap, stacks, buffers; not the
/// binary's code pages, which the kernel maps in as paths run).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no RssAnon")
}

/// Opens `STREAMS` connections through `listen` and proves each carries bytes both ways.
async fn open_streams(listen: SocketAddr) -> Result<Vec<TcpStream>> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(listen).await?;
            let hello = format!("stream {i:04}\n");
            stream.write_all(hello.as_bytes()).await?;
            let mut echoed = vec![0u8; hello.len()];
            tokio::time::timeout(Duration::from_secs(60), stream.read_exact(&mut echoed))
                .await
                .context("no echo within 60 s")??;
            ensure!(echoed == hello.as_bytes(), "stream {i}: echoed {echoed:?}");
            Ok::<_, anyhow::Error>(stream)
        });
    }
    let mut streams = Vec::with_capacity(STREAMS);
    while let Some(joined) = tasks.join_next().await {
        streams.push(joined??);
    }
    Ok(streams)
}

/// Waits for every stream to end (EOF or an error); the number that did not within
/// [`END_LIMIT`], and the slowest end.
async fn ends(streams: Vec<TcpStream>) -> (usize, Duration) {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        tasks.spawn(async move {
            let mut buffer = [0u8; 1024];
            let ended = tokio::time::timeout(END_LIMIT, async {
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            (ended.is_ok(), started.elapsed())
        });
    }
    let (mut hung, mut slowest) = (0, Duration::ZERO);
    while let Some(Ok((ended, after))) = tasks.join_next().await {
        if ended {
            slowest = slowest.max(after);
        } else {
            hung += 1;
        }
    }
    (hung, slowest)
}

async fn works(listen: SocketAddr, what: &str) -> Result<Duration> {
    let started = Instant::now();
    eventually(what, Duration::from_secs(20), || async {
        (exchange(listen, b"again").await.ok()? == b"again").then_some(())
    })
    .await?;
    Ok(started.elapsed())
}

/// Waits (30 s at most) until the `-L` bridge has given back at least three quarters of what
/// `loaded` (its memory with the streams open) added to `idle` (its memory before them), and
/// holds no more than `ceiling`; its memory then.
async fn gives_back(pid: u32, idle: u64, loaded: u64, ceiling: u64, when: &str) -> Result<u64> {
    let limit = (idle + loaded.saturating_sub(idle) / 4).min(ceiling);
    eventually(
        &format!(
            "the -L bridge's memory from {loaded} KiB with the streams down to {limit} KiB \
             (idle: {idle} KiB) {when}"
        ),
        Duration::from_secs(30),
        || async { rss_kib(pid).ok().filter(|rss| *rss <= limit) },
    )
    .await
    .with_context(|| format!("now {:?} KiB", rss_kib(pid).ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_end_when_the_relay_or_the_listener_dies_and_memory_is_given_back()
-> Result<()> {
    let dir = temp_dir("bridge-faults-");
    let mut relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let server = echo_server().await;
    let port = free_port();
    let listen = local(port);
    let target = format!("api:echo/{server}");
    let mut remote = Bridge::start("remote-1", &relay, &["-T", &target])?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{port}/echo:api")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    let pid = local_bridge.process.pid().context("the -L bridge's pid")?;
    works(listen, "a first stream").await?;
    let idle = rss_kib(pid)?;

    // 1. The relay dies under 1,000 open streams.
    let streams = open_streams(listen).await?;
    let loaded = rss_kib(pid)?;
    relay.stop();
    let (hung, slowest) = ends(streams).await;
    ensure!(
        hung == 0,
        "{hung} of {STREAMS} streams hung after the relay died"
    );
    relay.restart().await?;
    let back = works(listen, "a stream through the restarted relay").await?;
    let after_relay = gives_back(pid, idle, loaded, u64::MAX, "after the relay's restart").await?;
    eprintln!(
        "bridge faults: relay killed under {STREAMS} streams: all ended within {:.2} s; \
         streams again {:.2} s after the restart; -L bridge RssAnon idle {idle} KiB, \
         {loaded} KiB with the streams, {after_relay} KiB after",
        slowest.as_secs_f64(),
        back.as_secs_f64()
    );

    // 2. The listener dies under 1,000 open streams.
    remote.wait_ready(Duration::from_secs(20)).await?;
    let streams = open_streams(listen).await?;
    let loaded = rss_kib(pid)?;
    remote.process.kill();
    let (hung, slowest) = ends(streams).await;
    ensure!(
        hung == 0,
        "{hung} of {STREAMS} streams hung after the listener died"
    );
    remote = Bridge::start("remote-2", &relay, &["-T", &target])?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    let back = works(listen, "a stream to the restarted listener").await?;
    // A second thousand streams leave no more behind than the first (nothing leaks).
    let ceiling = after_relay + (after_relay / 4).max(2048);
    let after_listener = gives_back(
        pid,
        after_relay,
        loaded,
        ceiling,
        "after the listener's restart",
    )
    .await?;
    eprintln!(
        "bridge faults: listener killed under {STREAMS} streams: all ended within {:.2} s; \
         streams again {:.2} s after its restart; -L bridge RssAnon {loaded} KiB with the \
         streams, {after_listener} KiB after",
        slowest.as_secs_f64(),
        back.as_secs_f64()
    );
    drop(remote);
    Ok(())
}
