//! `kips connect` with the bridge built into kips (no azbridge to install), against the test
//! relay (`kips relay`) on loopback: a `kips bridge -L` stands in for the cluster's sidecar,
//! the workload comes from a manifest (`-f`), and a local server is the developer's app.
//! Every process is killed when its guard drops.

#[path = "support/bridge.rs"]
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use support::{Bridge, KIPS, Relay, eventually, exchange, free_port, tag_server, temp_dir};

fn manifest() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dev/workloads.yaml")
}

/// `kips connect sts/cache` (redirect `6379`, relay `cache`) served on `local_port`.
fn connect(
    relay: &Relay,
    dir: &Path,
    local_port: u16,
    connection_string: &str,
) -> Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(KIPS)
        .args(["connect", "sts/cache", "-f"])
        .arg(manifest())
        .arg("--port-map")
        .arg(format!("6379={local_port}"))
        .arg("--relay-ca")
        .arg(relay.ca())
        .arg("--hosts-file")
        .arg(dir.join("hosts"))
        .env("KIPS_RELAY_CONNECTION_STRING", connection_string)
        .env_remove("KIPS_AZBRIDGE")
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

#[tokio::test]
async fn the_built_in_bridge_carries_the_clusters_connections_to_the_local_app() -> Result<()> {
    let dir = temp_dir("kips-connect-builtin-");
    let relay = Relay::start(dir.path(), &["cache"], &[]).await?;
    let app = tag_server("laptop").await;
    let mut laptop = connect(&relay, dir.path(), app.port(), &relay.connection_string())?;

    // The cluster's side: the sidecar's -L, with the binding name the webhook writes.
    let sidecar_port = free_port();
    let sidecar = Bridge::start(
        "sidecar",
        &relay,
        &["-L", &format!("127.0.0.1:{sidecar_port}/6379:cache")],
    )?;
    sidecar.wait_ready(Duration::from_secs(15)).await?;
    let address = format!("127.0.0.1:{sidecar_port}").parse()?;
    let answer = eventually(
        "the laptop to answer through the relay",
        Duration::from_secs(15),
        || async move { exchange(address, b"").await.ok().filter(|a| a == b"laptop") },
    )
    .await;
    if answer.is_err() {
        laptop.start_kill()?;
        let output = laptop.wait_with_output().await?;
        anyhow::bail!(
            "no answer from the laptop; kips connect said:\n{}{}\nrelay:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            relay.log_text()
        );
    }

    // Ctrl-C: the session ends cleanly.
    let pid = laptop.id().context("kips connect is gone")?;
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
    let output = tokio::time::timeout(Duration::from_secs(15), laptop.wait_with_output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "{}\n{stdout}{stderr}",
        output.status
    );
    ensure!(
        stdout.contains(
            "running the built-in bridge, as kips bridge -x <redacted> -T cache:6379/localhost:"
        ),
        "{stdout}"
    );
    ensure!(
        !stdout.contains("kips-test") && !stderr.contains("SharedAccessKey="),
        "the key leaked"
    );
    Ok(())
}

#[tokio::test]
async fn a_refused_key_ends_kips_connect_with_the_bridges_status_naming_401() -> Result<()> {
    let dir = temp_dir("kips-connect-builtin-");
    let relay = Relay::start(dir.path(), &["cache"], &[]).await?;
    let wrong = relay.connection_string_with(support::KEY_NAME, "d3JvbmcK");
    let laptop = connect(&relay, dir.path(), free_port(), &wrong)?;
    let output = tokio::time::timeout(Duration::from_secs(15), laptop.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    ensure!(stderr.contains("401"), "{stderr}");
    ensure!(stderr.contains("\"cache\""), "{stderr}");
    Ok(())
}
