//! Interop with Microsoft's own Hybrid Connections client, the npm package `hyco-ws`
//! (pinned in tests/interop/package-lock.json, installed by scripts/test.sh with `npm ci`):
//! a hyco-ws listener speaking azbridge's preamble receives what `kips bridge -L` sends
//! through `kips relay`, and a hyco-ws sender reaches TCP and UDP echo servers through
//! `kips bridge -T`. This proves the relay and kips' client speak the public protocol, not
//! merely each other.
//!
//! Node and the installed packages are required: without them the suite fails (it never
//! skips), saying how to install them.

#[path = "support/bridge.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Node, and hyco-ws installed from the lock file (installed here if scripts/test.sh has
/// not done it yet).
fn node() -> Result<&'static str> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    let version = std::process::Command::new("node").arg("--version").output();
    ensure!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "node is required for the hyco-ws interop suite (Debian: apt-get install nodejs npm): {version:?}"
    );
    let dir = interop_dir();
    if !*installed && !dir.join("node_modules/hyco-ws/package.json").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .context("npm is required to install hyco-ws (npm ci in tests/interop)")?;
        ensure!(
            status.success(),
            "npm ci in {} failed: {status}",
            dir.display()
        );
    }
    *installed = true;
    Ok("node")
}

fn node_env(relay: &Relay, entity: &str) -> Vec<(&'static str, String)> {
    vec![
        ("NODE_EXTRA_CA_CERTS", relay.ca().display().to_string()),
        ("RELAY", format!("127.0.0.1:{}", relay.port)),
        ("ENTITY", entity.to_owned()),
        ("KEY_NAME", KEY_NAME.to_owned()),
        ("KEY", KEY.to_owned()),
    ]
}

async fn wait_for_line(process: &Process, needle: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !process.log_text().contains(needle) {
        if Instant::now() > deadline {
            bail!(
                "no {needle} within {limit:?}; output:\n{}",
                process.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn script(name: &str) -> String {
    interop_dir().join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hyco_ws_listener_receives_what_kips_bridge_l_sends() -> Result<()> {
    let node = node()?;
    let dir = temp_dir("interop-listener-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let mut env = node_env(&relay, "api");
    env.push(("NAMES", "echo".into()));
    let listener = Process::spawn(
        "hyco-ws-listener",
        node,
        &[script("listener.js")],
        &env,
        dir.path(),
    )?;
    wait_for_line(&listener, r#""event":"listening""#, Duration::from_secs(15)).await?;
    let listen = free_port();
    let bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/echo:api")],
    )?;
    bridge.wait_ready(Duration::from_secs(15)).await?;

    let payload = pattern(256 * 1024, 7);
    let mut stream = TcpStream::connect(("127.0.0.1", listen)).await?;
    let (mut read, mut write) = stream.split();
    let sending = async {
        write.write_all(&payload).await?;
        Ok::<_, std::io::Error>(())
    };
    let mut echoed = vec![0u8; payload.len()];
    let receiving = tokio::time::timeout(Duration::from_secs(20), read.read_exact(&mut echoed));
    let (sent, received) = tokio::join!(sending, receiving);
    sent?;
    received.context("the echo did not come back")??;
    assert!(echoed == payload, "the hyco-ws listener's echo differs");
    drop(stream);
    wait_for_line(
        &listener,
        &format!(r#""event":"closed","received":{}"#, payload.len()),
        Duration::from_secs(10),
    )
    .await?;
    assert!(
        listener
            .log_text()
            .contains(r#""event":"accepted","name":"echo","mode":0"#)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hyco_ws_sender_reaches_echo_servers_through_kips_bridge_t() -> Result<()> {
    let node = node()?;
    let dir = temp_dir("interop-sender-");
    let relay = Relay::start(dir.path(), &["api", "api-empty"], &[]).await?;
    let tcp = echo_server().await;
    let udp = udp_echo_server().await;
    let bridge = Bridge::start(
        "remote",
        &relay,
        &["-T", &format!("api:echo/{tcp};dns/{udp}U")],
    )?;
    bridge.wait_ready(Duration::from_secs(15)).await?;
    let mut env = node_env(&relay, "api");
    env.push((
        "CASES",
        "stream:echo:1048576,datagram:dns:50,unknown:nobody,mismatch:echo,nolistener".into(),
    ));
    let mut sender = Process::spawn(
        "hyco-ws-sender",
        node,
        &[script("sender.js")],
        &env,
        dir.path(),
    )?;
    let status = sender.exited_within(Duration::from_secs(60)).await;
    let output = sender.log_text();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{output}");
    for case in [
        "stream:echo:1048576",
        "datagram:dns:50",
        "unknown:nobody",
        "mismatch:echo",
        "nolistener",
    ] {
        assert!(
            output.contains(&format!(r#""case":"{case}","ok":true"#)),
            "{case} did not pass:\n{output}"
        );
    }
    let (_, metrics) = bridge.get("/metrics").await?;
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_payload_bytes_total",
            &["binding=\"echo\"", "direction=\"from_relay\""]
        ),
        Some(1048576.0),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn the_interop_packages_are_pinned() -> Result<()> {
    let lock = std::fs::read_to_string(interop_dir().join("package-lock.json"))?;
    assert!(
        lock.contains(r#""node_modules/hyco-ws": {"#) && lock.contains(r#""version": "1.0.5""#)
    );
    assert!(
        lock.contains("\"integrity\": \"sha512-"),
        "the lock file pins integrity hashes"
    );
    let _ = Path::new(&interop_dir())
        .join("core-module-stub/package.json")
        .metadata()?;
    Ok(())
}
