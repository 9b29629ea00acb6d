//! Faults, over real TLS, against the real `kips webhook` binary: certificate files swapped
//! while 8 clients send requests, SIGTERM under load, HTTP/2 abuse (rapid reset, a
//! CONTINUATION flood), 500 TLS handshakes that never finish, and bodies that declare 3 MiB
//! and stall. In each, well-behaved clients keep being served (every request answered, each
//! within `GOOD_LATENCY`), the abusive connection is closed within a bound, and the
//! webhook's peak memory stays under `PEAK_RSS_LIMIT_KIB`.
//!
//! The bounds are generous for a loaded 2-core CI machine; the figures each test saw are
//! printed (`cargo test --test webhook_faults -- --nocapture`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use axum::body::Bytes;
use kips::tls::{generate_ca, issue_serving_cert, local_names};
use serde_json::Value;
use support::webhook::{
    TlsStream, Webhook, client_trusting, fixture, leaf_der, post_head, publish_secret_volume,
    read_to_close, tls_connect, tls_connect_alpn, wait_for_leaf,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// A well-behaved request is answered within this, whatever else the server endures.
const GOOD_LATENCY: Duration = Duration::from_secs(2);
/// The webhook's peak resident memory (VmHWM) through any of these faults. It idles at
/// about 10 MiB.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;

/// The typical review (a Deployment's pod, injected) with its own uid.
fn review_body(uid: &str) -> Result<Vec<u8>> {
    let mut review: Value =
        serde_json::from_str(&fixture("admission/pod-deployment-typical.json")?)?;
    review["request"]["uid"] = Value::String(uid.to_owned());
    Ok(serde_json::to_vec(&review)?)
}

/// How one client's connections are used.
#[derive(Debug, Clone, Copy)]
enum Style {
    /// One keep-alive connection, HTTP/1.1 or HTTP/2.
    KeepAlive { http2: bool },
    /// A new connection (and TLS handshake) for every request.
    Fresh { http2: bool },
}

/// What one request's client saw.
#[derive(Debug)]
enum Outcome {
    /// The HTTP status, and whether the answer was kips' patch for this uid.
    Answered {
        status: u16,
        patched: bool,
    },
    Failed(String),
}

#[derive(Debug)]
struct Sent {
    uid: String,
    started: Instant,
    latency: Duration,
    outcome: Outcome,
}

/// Clients sending the typical review in a loop until stopped, each request with a uid of
/// its own, recording what each saw.
struct Clients {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Result<Vec<Sent>>>,
}

impl Clients {
    fn start(webhook: &Webhook, ca_pem: &str, styles: &[Style], pause: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for (index, style) in styles.iter().copied().enumerate() {
            let (stop, url, ca_pem) = (stop.clone(), webhook.url("/mutate"), ca_pem.to_owned());
            tasks.spawn(async move {
                let client = |http2| -> Result<reqwest::Client> { client_trusting(&ca_pem, http2) };
                let keep_alive = match style {
                    Style::KeepAlive { http2 } => Some(client(http2)?),
                    Style::Fresh { .. } => None,
                };
                let mut sent = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let uid = format!("client-{index}-{}", sent.len());
                    let body = review_body(&uid)?;
                    let started = Instant::now();
                    let client = match (&keep_alive, style) {
                        (Some(client), _) => client.clone(),
                        (None, Style::Fresh { http2 } | Style::KeepAlive { http2 }) => {
                            client(http2)?
                        }
                    };
                    let outcome = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            match response.bytes().await {
                                Ok(answer) => {
                                    let answer: Value =
                                        serde_json::from_slice(&answer).unwrap_or_default();
                                    Outcome::Answered {
                                        status,
                                        patched: answer["response"]["uid"] == uid.as_str()
                                            && answer["response"]["patch"].is_string(),
                                    }
                                }
                                Err(error) => {
                                    Outcome::Failed(format!("reading the answer: {error:#}"))
                                }
                            }
                        }
                        Err(error) => Outcome::Failed(format!("{error:#}")),
                    };
                    sent.push(Sent {
                        uid,
                        started,
                        latency: started.elapsed(),
                        outcome,
                    });
                    tokio::time::sleep(pause).await;
                }
                Ok(sent)
            });
        }
        Ok(Self { stop, tasks })
    }

    async fn stop(mut self) -> Result<Vec<Sent>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            all.extend(joined??);
        }
        Ok(all)
    }

    /// Stops, and checks that every request was answered with kips' patch within
    /// `GOOD_LATENCY`. Returns how many there were and the slowest.
    async fn stop_all_served(self, what: &str) -> Result<(usize, Duration)> {
        let sent = self.stop().await?;
        ensure!(!sent.is_empty(), "{what}: the good clients sent nothing");
        let mut slowest = Duration::ZERO;
        for request in &sent {
            match &request.outcome {
                Outcome::Answered {
                    status: 200,
                    patched: true,
                } => {}
                other => bail!("{what}: good request {} got {other:?}", request.uid),
            }
            ensure!(
                request.latency <= GOOD_LATENCY,
                "{what}: good request {} took {:?}",
                request.uid,
                request.latency
            );
            slowest = slowest.max(request.latency);
        }
        Ok((sent.len(), slowest))
    }
}

/// The good clients every abuse test runs beside the abuse: a keep-alive HTTP/2 client (as
/// the API server is), and one that makes a new connection per request (new handshakes).
fn good_clients(webhook: &Webhook) -> Result<Clients> {
    Clients::start(
        webhook,
        &webhook.ca_pem()?,
        &[
            Style::KeepAlive { http2: true },
            Style::Fresh { http2: false },
        ],
        Duration::from_millis(20),
    )
}

fn check_memory(webhook: &Webhook, what: &str) -> Result<(u64, u64)> {
    let (rss, peak) = webhook.memory_kib()?;
    ensure!(
        peak <= PEAK_RSS_LIMIT_KIB,
        "{what}: the webhook's peak RSS reached {peak} KiB (limit {PEAK_RSS_LIMIT_KIB})"
    );
    Ok((rss, peak))
}

fn no_panic(webhook: &Webhook) -> Result<()> {
    ensure!(
        !webhook.logs().contains("panicked"),
        "the webhook panicked:\n{}",
        webhook.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_swapped_while_eight_clients_send_fail_no_request() -> Result<()> {
    let started = Instant::now();
    let ca = generate_ca("faults test CA", Duration::from_secs(3600))?;
    let names = local_names(&[]);
    let pairs = (0..9)
        .map(|_| issue_serving_cert(&ca, &names, Duration::from_secs(600)))
        .collect::<Result<Vec<_>>>()?;
    let volume = tempfile::tempdir()?;
    publish_secret_volume(volume.path(), "..v0", &pairs[0])?;
    // A long poll interval: the swaps are noticed from the directory events, as in a pod.
    let webhook = Webhook::start(&[
        &format!("--tls-cert={}", volume.path().join("tls.crt").display()),
        &format!("--tls-key={}", volume.path().join("tls.key").display()),
        "--tls-poll-interval=1h",
    ])?;
    let styles = [
        Style::KeepAlive { http2: true },
        Style::KeepAlive { http2: true },
        Style::KeepAlive { http2: false },
        Style::KeepAlive { http2: false },
        Style::Fresh { http2: true },
        Style::Fresh { http2: true },
        Style::Fresh { http2: false },
        Style::Fresh { http2: false },
    ];
    let clients = Clients::start(&webhook, &ca.cert, &styles, Duration::ZERO)?;
    for (version, pair) in pairs.iter().enumerate().skip(1) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        publish_secret_volume(volume.path(), &format!("..v{version}"), pair)?;
        // The kubelet removes the old version once the link points at the new one.
        std::fs::remove_dir_all(volume.path().join(format!("..v{}", version - 1)))?;
        wait_for_leaf(&webhook, &ca.cert, &leaf_der(pair)).await?;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let sent = clients.stop().await?;
    let mut per_client: BTreeMap<&str, usize> = BTreeMap::new();
    for request in &sent {
        match &request.outcome {
            Outcome::Answered {
                status: 200,
                patched: true,
            } => {}
            other => bail!(
                "request {} got {other:?}; log:\n{}",
                request.uid,
                webhook.logs()
            ),
        }
        let client = request
            .uid
            .rsplit_once('-')
            .map_or("", |(client, _)| client);
        *per_client.entry(client).or_default() += 1;
    }
    ensure!(
        per_client.len() == 8 && per_client.values().all(|n| *n >= 3),
        "{per_client:?}"
    );
    let metrics = client_trusting(&ca.cert, false)?
        .get(webhook.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains("kips_certificate_reloads_total{result=\"loaded\"} 8"),
        "eight reloads: {metrics}"
    );
    no_panic(&webhook)?;
    println!(
        "8 swaps under 8 clients: {} requests, none failed, in {:?}",
        sent.len(),
        started.elapsed()
    );
    Ok(())
}

/// The uids the webhook logged as reviewed (decided; the answer is written after).
fn reviewed_uids(logs: &str) -> BTreeSet<String> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == "reviewed")
        .filter_map(|line| line["span"]["uid"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_accepted_request_and_exits_within_the_drain_timeout()
-> Result<()> {
    let drain = Duration::from_secs(3);
    let mut webhook = Webhook::start(&["--drain-timeout=3s"])?;
    let ca = webhook.ca_pem()?;
    let styles = [
        Style::KeepAlive { http2: true },
        Style::KeepAlive { http2: true },
        Style::KeepAlive { http2: false },
        Style::KeepAlive { http2: false },
        Style::Fresh { http2: true },
        Style::Fresh { http2: false },
    ];
    let clients = Clients::start(&webhook, &ca, &styles, Duration::from_millis(2))?;
    // Requests in flight at SIGTERM: headers and half the body sent, over both protocols;
    // and one that will never finish, which must not hold the exit past the drain timeout.
    let mut in_flight_h1 = Vec::new();
    for index in 0..3 {
        let body = review_body(&format!("in-flight-h1-{index}"))?;
        let mut stream = tls_connect(webhook.addr, &ca).await?;
        stream.write_all(post_head(body.len()).as_bytes()).await?;
        stream.write_all(&body[..body.len() / 2]).await?;
        stream.flush().await?;
        in_flight_h1.push((stream, body));
    }
    let mut in_flight_h2 = Vec::new();
    for index in 0..3 {
        let body = review_body(&format!("in-flight-h2-{index}"))?;
        let mut sender = h2_client(&webhook, &ca).await?;
        let (response, mut stream) = start_post(&mut sender, body.len()).await?;
        stream.send_data(Bytes::copy_from_slice(&body[..body.len() / 2]), false)?;
        in_flight_h2.push((sender, response, stream, body));
    }
    let mut never_finished = tls_connect(webhook.addr, &ca).await?;
    never_finished.write_all(post_head(1000).as_bytes()).await?;
    never_finished.write_all(b"{").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    webhook.signal_term()?;
    let signalled = Instant::now();
    // Draining: the listener is closed at once (shutdown delay 0)...
    let mut refused = false;
    while signalled.elapsed() < Duration::from_secs(2) {
        if tokio::net::TcpStream::connect(webhook.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        refused,
        "new connections were still accepted 2 s after SIGTERM"
    );
    // ...and the requests in flight are answered.
    for (mut stream, body) in in_flight_h1 {
        stream.write_all(&body[body.len() / 2..]).await?;
        let answer = read_to_close(&mut stream, drain).await?;
        let answer = String::from_utf8_lossy(&answer);
        ensure!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("JSONPatch"),
            "{answer}"
        );
    }
    for (_sender, response, mut stream, body) in in_flight_h2 {
        stream.send_data(Bytes::copy_from_slice(&body[body.len() / 2..]), true)?;
        let response = tokio::time::timeout(drain, response).await??;
        ensure!(response.status() == 200, "{response:?}");
        let mut answer = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = tokio::time::timeout(drain, answer.data()).await? {
            let chunk = chunk?;
            let _ = answer.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        ensure!(String::from_utf8_lossy(&text).contains("JSONPatch"));
    }
    let status = webhook.wait_exit(drain + Duration::from_secs(2))?;
    let exited = signalled.elapsed();
    ensure!(status.success(), "exit status {status}");
    ensure!(
        exited <= drain + Duration::from_secs(1),
        "exited {exited:?} after SIGTERM (drain timeout {drain:?})"
    );
    drop(never_finished);

    let sent = clients.stop().await?;
    let reviewed = reviewed_uids(&webhook.logs());
    let (mut answered, mut failed) = (0, 0);
    for request in &sent {
        match &request.outcome {
            Outcome::Answered {
                status: 200,
                patched: true,
            } => answered += 1,
            Outcome::Answered { .. } => {
                bail!("{} answered wrongly: {:?}", request.uid, request.outcome)
            }
            Outcome::Failed(error) => {
                // Only what the server never accepted may fail: after the signal, and
                // never a request it decided.
                ensure!(
                    request.started + request.latency >= signalled,
                    "{} failed before SIGTERM: {error}",
                    request.uid
                );
                ensure!(
                    !reviewed.contains(&request.uid),
                    "{} was reviewed by the server but its client got no answer: {error}",
                    request.uid
                );
                failed += 1;
            }
        }
    }
    for uid in (0..3).flat_map(|i| [format!("in-flight-h1-{i}"), format!("in-flight-h2-{i}")]) {
        ensure!(reviewed.contains(&uid), "{uid} was not reviewed");
    }
    ensure!(
        answered > 50,
        "too little load before SIGTERM: {answered} answered"
    );
    println!(
        "SIGTERM under load: {answered} answered, {failed} not accepted (after the signal), 6 in flight answered, exit after {exited:?}"
    );
    Ok(())
}

/// An HTTP/2 connection driven by hand (the `h2` crate), trusting only the webhook's CA.
async fn h2_client(webhook: &Webhook, ca: &str) -> Result<h2::client::SendRequest<Bytes>> {
    let (sender, connection) = h2_connect(webhook, ca).await?;
    tokio::spawn(connection);
    Ok(sender)
}

type H2Connection = h2::client::Connection<TlsStream, Bytes>;

async fn h2_connect(
    webhook: &Webhook,
    ca: &str,
) -> Result<(h2::client::SendRequest<Bytes>, H2Connection)> {
    let tls = tls_connect_alpn(webhook.addr, ca, b"h2").await?;
    Ok(h2::client::handshake(tls).await?)
}

/// Opens a `POST /mutate` stream declaring `length` bytes of body, sending none yet.
async fn start_post(
    sender: &mut h2::client::SendRequest<Bytes>,
    length: usize,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    let request = axum::http::Request::post("https://localhost/mutate")
        .header("content-type", "application/json")
        .header("content-length", length)
        .body(())?;
    let ready = sender.clone().ready().await?;
    *sender = ready;
    Ok(sender.send_request(request, false)?)
}

/// How long an abuse is kept up (a new abusive connection each time one is cut off), and
/// how soon each abusive connection must be cut off.
const ABUSE_FOR: Duration = Duration::from_secs(3);
const CUT_OFF_WITHIN: Duration = Duration::from_secs(5);

/// What the abusive connections of one test saw.
#[derive(Debug, Default)]
struct Abuse {
    connections: usize,
    /// Streams or frames sent, over all connections.
    sent: usize,
    slowest_cut_off: Duration,
    /// How the server ended them (GOAWAY codes, errors), and how often.
    endings: BTreeMap<String, usize>,
}

impl Abuse {
    fn record(&mut self, sent: usize, cut_off_after: Duration, ending: String) {
        self.connections += 1;
        self.sent += sent;
        self.slowest_cut_off = self.slowest_cut_off.max(cut_off_after);
        *self.endings.entry(ending).or_default() += 1;
    }
}

/// One rapid-reset connection: opens and resets streams as fast as the connection takes
/// them (each a request the server must set up and tear down, CVE-2023-44487), until the
/// server ends the connection. Returns the streams sent, when the connection ended after
/// the first, and how.
async fn rapid_reset_once(webhook: &Webhook, ca: &str) -> Result<(usize, Duration, String)> {
    let (mut sender, connection) = h2_connect(webhook, ca).await?;
    let connection = tokio::spawn(async move {
        let result = connection.await;
        (Instant::now(), result)
    });
    let started = Instant::now();
    let mut opened = 0usize;
    while opened < 100_000 && started.elapsed() < CUT_OFF_WITHIN {
        match start_post(&mut sender, 7_000).await {
            Ok((_response, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
    }
    let (ended_at, result) = tokio::time::timeout(CUT_OFF_WITHIN, connection)
        .await
        .map_err(|_| anyhow!("a rapid-reset connection is still open after {opened} resets"))??;
    let ending = match result {
        Ok(()) => "closed".to_owned(),
        Err(error) => match error.reason() {
            Some(reason) if error.is_go_away() => format!("GOAWAY {reason:?}"),
            Some(reason) => format!("reset {reason:?}"),
            None => error.to_string(),
        },
    };
    Ok((opened, ended_at.duration_since(started), ending))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_off_and_others_stay_served() -> Result<()> {
    let webhook = Webhook::start(&[])?;
    let ca = webhook.ca_pem()?;
    let good = good_clients(&webhook)?;
    let mut abuse = Abuse::default();
    let started = Instant::now();
    while started.elapsed() < ABUSE_FOR {
        let (opened, cut_off_after, ending) = rapid_reset_once(&webhook, &ca).await?;
        ensure!(
            cut_off_after <= CUT_OFF_WITHIN,
            "cut off only after {cut_off_after:?}"
        );
        abuse.record(opened, cut_off_after, ending);
    }
    let (served, slowest) = good.stop_all_served("rapid reset").await?;
    ensure!(served >= 20, "only {served} good requests in {ABUSE_FOR:?}");
    let (rss, peak) = check_memory(&webhook, "rapid reset")?;
    no_panic(&webhook)?;
    println!(
        "rapid reset for {ABUSE_FOR:?}: {} connections, {} streams opened and reset, each connection ended within {:?} ({:?}); good clients: {served} served, slowest {slowest:?}; RSS {rss} KiB, peak {peak} KiB",
        abuse.connections, abuse.sent, abuse.slowest_cut_off, abuse.endings
    );
    Ok(())
}

/// One HTTP/2 frame: 9 bytes of header (length, type, flags, stream) and the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FRAME_CONTINUATION: u8 = 0x9;

/// HPACK: a literal header field without indexing, with a literal name.
fn literal_header(name: &[u8], value: &[u8]) -> Vec<u8> {
    assert!(name.len() < 127 && value.len() < 127);
    let mut out = vec![0x00, name.len() as u8];
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
    out
}

/// Reads frames until the server closes the connection; returns the GOAWAY's error code
/// if one came.
async fn read_until_closed(mut reader: tokio::io::ReadHalf<TlsStream>) -> Option<u32> {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut goaway = None;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return goaway,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        while data.len() >= 9 {
            let length = u32::from_be_bytes([0, data[0], data[1], data[2]]) as usize;
            if data.len() < 9 + length {
                break;
            }
            if data[3] == FRAME_GOAWAY && length >= 8 {
                goaway = Some(u32::from_be_bytes(
                    data[13..17].try_into().expect("4 bytes"),
                ));
            }
            data.drain(..9 + length);
        }
    }
}

/// One CONTINUATION-flood connection: HEADERS without END_HEADERS (POST https /mutate),
/// then CONTINUATION frames that never end the header block (CVE-2024-27316), until the
/// server closes the connection. Returns the frames sent, when the connection was closed
/// after the first, and how (the GOAWAY's error code).
async fn continuation_flood_once(webhook: &Webhook, ca: &str) -> Result<(usize, Duration, String)> {
    let tls = tls_connect_alpn(webhook.addr, ca, b"h2").await?;
    ensure!(
        tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        "the server chose HTTP/2"
    );
    let (reader, mut writer) = tokio::io::split(tls);
    let reader = tokio::spawn(async move {
        let goaway = read_until_closed(reader).await;
        (Instant::now(), goaway)
    });
    writer
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await?;
    writer.write_all(&frame(FRAME_SETTINGS, 0, 0, &[])).await?;
    let mut block = vec![0x83, 0x87]; // :method POST, :scheme https
    block.extend_from_slice(&[0x44, 7]); // :path, literal value
    block.extend_from_slice(b"/mutate");
    writer
        .write_all(&frame(FRAME_HEADERS, 0, 1, &block))
        .await?;
    let mut continuation = Vec::new();
    for index in 0..32 {
        continuation.extend(literal_header(
            format!("x-flood-{index:02}").as_bytes(),
            &[b'a'; 100],
        ));
    }
    let continuation = frame(FRAME_CONTINUATION, 0, 1, &continuation);
    let started = Instant::now();
    let mut frames = 0usize;
    while started.elapsed() < CUT_OFF_WITHIN && !reader.is_finished() {
        match tokio::time::timeout(Duration::from_secs(1), writer.write_all(&continuation)).await {
            Ok(Ok(())) => frames += 1,
            Ok(Err(_)) => break,
            Err(_) => {} // the server stopped reading: see whether it closes
        }
    }
    let (closed_at, goaway) = tokio::time::timeout(CUT_OFF_WITHIN, reader)
        .await
        .map_err(|_| {
            anyhow!("a flooding connection is still open after {frames} CONTINUATION frames")
        })??;
    let ending = goaway.map_or("closed without GOAWAY".to_owned(), |code| {
        format!("GOAWAY code {code}")
    });
    Ok((frames, closed_at.duration_since(started), ending))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_flood_is_cut_off_and_others_stay_served() -> Result<()> {
    let webhook = Webhook::start(&[])?;
    let ca = webhook.ca_pem()?;
    let good = good_clients(&webhook)?;
    let mut abuse = Abuse::default();
    let started = Instant::now();
    while started.elapsed() < ABUSE_FOR {
        let (frames, cut_off_after, ending) = continuation_flood_once(&webhook, &ca).await?;
        ensure!(
            cut_off_after <= CUT_OFF_WITHIN,
            "cut off only after {cut_off_after:?}"
        );
        abuse.record(frames, cut_off_after, ending);
    }
    let (served, slowest) = good.stop_all_served("CONTINUATION flood").await?;
    ensure!(served >= 20, "only {served} good requests in {ABUSE_FOR:?}");
    let (rss, peak) = check_memory(&webhook, "CONTINUATION flood")?;
    no_panic(&webhook)?;
    println!(
        "CONTINUATION flood for {ABUSE_FOR:?}: {} connections, {} frames, each closed within {:?} ({:?}); good clients: {served} served, slowest {slowest:?}; RSS {rss} KiB, peak {peak} KiB",
        abuse.connections, abuse.sent, abuse.slowest_cut_off, abuse.endings
    );
    Ok(())
}

/// Lets this process hold `wanted` descriptors (the default soft limit is often 1024).
fn raise_open_files(wanted: u64) -> Result<()> {
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_unfinished_handshakes_are_closed_after_the_timeout_while_others_are_served()
-> Result<()> {
    raise_open_files(4096)?;
    let timeout = Duration::from_secs(2);
    let webhook = Webhook::start(&["--handshake-timeout=2s"])?;
    let good = good_clients(&webhook)?;
    // Half say nothing after connecting; half start a ClientHello (a TLS record header
    // announcing 512 bytes, and 16 of them) and stall.
    let mut pending: Vec<(Instant, tokio::net::TcpStream)> = Vec::with_capacity(500);
    for index in 0..500 {
        // Before the connection exists, so before the server's timer starts.
        let connecting = Instant::now();
        let mut tcp = tokio::net::TcpStream::connect(webhook.addr)
            .await
            .with_context(|| format!("connection {index}"))?;
        if index % 2 == 1 {
            let mut hello = vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            hello.extend_from_slice(&[0x42; 11]);
            tcp.write_all(&hello).await?;
        }
        pending.push((connecting, tcp));
    }
    let opened_in = pending
        .first()
        .map_or(Duration::ZERO, |(first, _)| first.elapsed());
    let mut closes = JoinSet::new();
    for (connected, mut tcp) in pending {
        closes.spawn(async move {
            read_to_close(&mut tcp, Duration::from_secs(10)).await?;
            Ok::<_, anyhow::Error>(connected.elapsed())
        });
    }
    let mut lifetimes = Vec::with_capacity(500);
    while let Some(joined) = closes.join_next().await {
        lifetimes.push(joined?.context("a connection without a handshake stayed open")?);
    }
    lifetimes.sort_unstable();
    let (first, last) = (lifetimes[0], lifetimes[lifetimes.len() - 1]);
    ensure!(
        first >= timeout - Duration::from_millis(50),
        "a pending handshake was closed after {first:?}, before the {timeout:?} timeout"
    );
    ensure!(
        last <= timeout + Duration::from_secs(3),
        "the last pending handshake was closed only after {last:?}"
    );
    let (served, slowest) = good.stop_all_served("500 unfinished handshakes").await?;
    let (rss, peak) = check_memory(&webhook, "500 unfinished handshakes")?;
    no_panic(&webhook)?;
    println!(
        "500 unfinished handshakes (opened in {:?}): closed after {first:?} – {last:?}; good clients: {served} served, slowest {slowest:?}; RSS {rss} KiB, peak {peak} KiB",
        opened_in,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_declare_three_mib_and_stall_get_408_after_the_request_timeout() -> Result<()> {
    let timeout = Duration::from_secs(2);
    let webhook = Webhook::start(&["--request-timeout=2s"])?;
    let ca = webhook.ca_pem()?;
    let good = good_clients(&webhook)?;
    let declared = kips::webhook::MAX_BODY_BYTES; // the largest the API server sends
    let started = Instant::now();
    let mut stalled = JoinSet::new();
    for index in 0..16 {
        let ca = ca.clone();
        let addr = webhook.addr;
        stalled.spawn(async move {
            if index % 2 == 0 {
                let mut stream = tls_connect(addr, &ca).await?;
                stream.write_all(post_head(declared).as_bytes()).await?;
                stream.write_all(&[b' '; 64 * 1024]).await?;
                let answer = read_to_close(&mut stream, timeout + Duration::from_secs(5)).await?;
                let answer = String::from_utf8_lossy(&answer).into_owned();
                ensure!(answer.starts_with("HTTP/1.1 408"), "HTTP/1.1: {answer}");
            } else {
                let tls = tls_connect_alpn(addr, &ca, b"h2").await?;
                let (mut sender, connection) = h2::client::handshake(tls).await?;
                tokio::spawn(connection);
                let (response, mut stream) = start_post(&mut sender, declared).await?;
                stream.send_data(Bytes::from(vec![b' '; 64 * 1024]), false)?;
                let response = tokio::time::timeout(timeout + Duration::from_secs(5), response)
                    .await
                    .map_err(|_| anyhow!("HTTP/2: no answer to a stalled body"))??;
                ensure!(response.status() == 408, "HTTP/2: {response:?}");
                drop(stream);
            }
            Ok::<_, anyhow::Error>(started.elapsed())
        });
    }
    let mut answered_after = Vec::new();
    while let Some(joined) = stalled.join_next().await {
        answered_after.push(joined??);
    }
    answered_after.sort_unstable();
    let (first, last) = (answered_after[0], answered_after[answered_after.len() - 1]);
    ensure!(
        first >= timeout - Duration::from_millis(200),
        "answered after {first:?}"
    );
    let (served, slowest) = good.stop_all_served("stalled 3 MiB bodies").await?;
    let (rss, peak) = check_memory(&webhook, "stalled 3 MiB bodies")?;
    no_panic(&webhook)?;
    println!(
        "16 stalled 3 MiB bodies (8 HTTP/1.1, 8 HTTP/2): 408 after {first:?} – {last:?}; good clients: {served} served, slowest {slowest:?}; RSS {rss} KiB, peak {peak} KiB"
    );
    Ok(())
}

/// One review over `sender`; its HTTP status.
async fn h2_review(sender: &mut h2::client::SendRequest<Bytes>, uid: &str) -> Result<u16> {
    let body = review_body(uid)?;
    let (response, mut stream) = start_post(sender, body.len()).await?;
    stream.send_data(Bytes::from(body), true)?;
    let response = tokio::time::timeout(GOOD_LATENCY, response).await??;
    Ok(response.status().as_u16())
}

/// With a shutdown delay, SIGTERM sends the connections already open away at once (HTTP/2
/// GOAWAY) while new connections are still accepted and answered until the delay ends: a
/// client that holds one connection to a Service (the API server) moves to a new one, which
/// kube-proxy gives to a live replica, instead of losing a review when the process dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_open_connections_away_and_accepts_new_ones_through_the_delay() -> Result<()>
{
    let delay = Duration::from_secs(4);
    let mut webhook = Webhook::start(&["--shutdown-delay=4s", "--drain-timeout=3s"])?;
    let ca = webhook.ca_pem()?;
    let (mut sender, connection) = h2_connect(&webhook, &ca).await?;
    let connection = tokio::spawn(connection);
    ensure!(h2_review(&mut sender, "before").await? == 200);

    webhook.signal_term()?;
    let signalled = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), connection)
        .await
        .map_err(|_| anyhow!("the open HTTP/2 connection was not sent away within 2 s"))?;
    let away_after = signalled.elapsed();
    // A new connection in the delay: accepted and answered.
    let mut fresh = h2_client(&webhook, &ca).await?;
    ensure!(h2_review(&mut fresh, "during-the-delay").await? == 200);
    ensure!(
        signalled.elapsed() < delay,
        "the new connection was answered only after the delay ({:?})",
        signalled.elapsed()
    );
    let status = webhook.wait_exit(Duration::from_secs(10))?;
    let exited = signalled.elapsed();
    ensure!(status.success(), "exit status {status}");
    ensure!(
        exited >= delay,
        "exited {exited:?} after SIGTERM, before the delay ended"
    );
    no_panic(&webhook)?;
    println!(
        "SIGTERM with a 4 s delay: open HTTP/2 connection sent away after {away_after:?} ({ended:?}), a new one answered, exit after {exited:?}"
    );
    Ok(())
}
