//! The served certificate rotates when its files change, the way a Secret volume changes them
//! (an atomic `..data` symlink swap): new handshakes see the new pair, connections already
//! open keep working, requests in flight finish, and a half-written pair is never served.

mod support;

use std::time::Duration;

use anyhow::{Result, bail};
use kips::tls::{PemPair, generate_ca, issue_serving_cert, local_names};
use support::webhook::{
    TlsStream, Webhook, fixture, leaf_der, post_head, publish_secret_volume as publish,
    served_leaf, tls_connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Tls = TlsStream;

async fn connect(webhook: &Webhook, ca: &PemPair) -> Result<Tls> {
    tls_connect(webhook.addr, &ca.cert).await
}

/// Sends one keep-alive request and reads its response (Content-Length framed).
async fn request(stream: &mut Tls, body: &[u8]) -> Result<String> {
    stream.write_all(post_head(body.len()).as_bytes()).await?;
    stream.write_all(body).await?;
    read_response(stream).await
}

async fn read_response(stream: &mut Tls) -> Result<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await??;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if rest.len() >= length {
                return Ok(text.into_owned());
            }
        }
    }
}

async fn wait_for_leaf(webhook: &Webhook, ca: &PemPair, expected: &[u8]) -> Result<Duration> {
    support::webhook::wait_for_leaf(webhook, &ca.cert, expected).await
}

#[tokio::test]
async fn a_secret_volume_swap_rotates_the_served_certificate() -> Result<()> {
    let ca = generate_ca("rotation test CA", Duration::from_secs(3600))?;
    let names = local_names(&[]);
    let first = issue_serving_cert(&ca, &names, Duration::from_secs(600))?;
    let second = issue_serving_cert(&ca, &names, Duration::from_secs(600))?;
    let volume = tempfile::tempdir()?;
    publish(volume.path(), "..2026_11_21_10_00_00.1", &first)?;

    // A long poll interval: the change must be noticed from the directory events alone.
    let webhook = Webhook::start(&[
        &format!("--tls-cert={}", volume.path().join("tls.crt").display()),
        &format!("--tls-key={}", volume.path().join("tls.key").display()),
        "--tls-poll-interval=1h",
    ])?;
    let body = fixture("admission/pod-deployment-typical.json")?.into_bytes();

    let mut kept_alive = connect(&webhook, &ca).await?;
    assert_eq!(served_leaf(&kept_alive), leaf_der(&first));
    assert!(
        request(&mut kept_alive, &body)
            .await?
            .starts_with("HTTP/1.1 200")
    );

    // A request in flight across the rotation: headers and half the body sent.
    let mut in_flight = connect(&webhook, &ca).await?;
    in_flight
        .write_all(post_head(body.len()).as_bytes())
        .await?;
    in_flight.write_all(&body[..body.len() / 2]).await?;

    publish(volume.path(), "..2026_11_21_11_00_00.2", &second)?;
    std::fs::remove_dir_all(volume.path().join("..2026_11_21_10_00_00.1"))?;
    let took = wait_for_leaf(&webhook, &ca, &leaf_der(&second)).await?;
    println!("new handshakes saw the new certificate after {took:?}");

    in_flight.write_all(&body[body.len() / 2..]).await?;
    let answer = read_response(&mut in_flight).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("JSONPatch"),
        "{answer}"
    );
    let answer = request(&mut kept_alive, &body).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the connection opened before the rotation still works: {answer}"
    );

    // A half-written update (a certificate whose key is not there yet) is not served: the
    // last good pair stays until the pair is consistent.
    let third = issue_serving_cert(&ca, &names, Duration::from_secs(600))?;
    let torn = PemPair {
        cert: third.cert.clone(),
        key: second.key.clone(),
    };
    publish(volume.path(), "..2026_11_21_12_00_00.3", &torn)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_leaf(&connect(&webhook, &ca).await?),
        leaf_der(&second)
    );
    publish(volume.path(), "..2026_11_21_12_00_01.4", &third)?;
    wait_for_leaf(&webhook, &ca, &leaf_der(&third)).await?;

    let metrics = reqwest_metrics(&webhook, &ca).await?;
    assert!(
        metrics.contains("kips_certificate_reloads_total{result=\"loaded\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kips_certificate_reloads_total{result=\"rejected\"}"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn files_rewritten_in_place_are_picked_up() -> Result<()> {
    let ca = generate_ca("poll test CA", Duration::from_secs(3600))?;
    let first = issue_serving_cert(&ca, &local_names(&[]), Duration::from_secs(600))?;
    let second = issue_serving_cert(&ca, &local_names(&[]), Duration::from_secs(600))?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (
        dir.path().join("serving.pem"),
        dir.path().join("serving-key.pem"),
    );
    std::fs::write(&cert, &first.cert)?;
    std::fs::write(&key, &first.key)?;
    let webhook = Webhook::start(&[
        &format!("--tls-cert={}", cert.display()),
        &format!("--tls-key={}", key.display()),
        "--tls-poll-interval=200ms",
    ])?;
    assert_eq!(
        served_leaf(&connect(&webhook, &ca).await?),
        leaf_der(&first)
    );
    std::fs::write(&key, &second.key)?;
    std::fs::write(&cert, &second.cert)?;
    wait_for_leaf(&webhook, &ca, &leaf_der(&second)).await?;
    Ok(())
}

async fn reqwest_metrics(webhook: &Webhook, ca: &PemPair) -> Result<String> {
    let client = support::webhook::client_trusting(&ca.cert, false)?;
    Ok(client
        .get(webhook.url("/metrics"))
        .send()
        .await?
        .text()
        .await?)
}
