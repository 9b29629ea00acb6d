//! The load client: keep-alive TLS connections that trust only the server's CA, HTTP/1.1
//! (one request at a time per connection, several connections) or HTTP/2 (one connection,
//! concurrent streams), as the API server calls webhooks. Open loop at a fixed rate, with
//! latency measured from each request's scheduled time (no coordinated omission), and
//! closed loop at maximum.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use axum::body::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The API server gives a webhook at most this long (timeoutSeconds' default).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
        }
    }
}

/// Where and how to send: one server, one protocol, one body.
#[derive(Clone)]
pub struct Target {
    pub port: u16,
    pub protocol: Protocol,
    pub tls: Arc<rustls::ClientConfig>,
    pub body: Bytes,
    /// Length of the server's answer to `body`, learnt from the first (checked) response.
    pub answer_len: usize,
}

impl Target {
    pub fn new(port: u16, protocol: Protocol, ca_pem: &str, body: Bytes) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.context("reading the CA")?)?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(kips::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![match protocol {
            Protocol::Http1 => b"http/1.1".to_vec(),
            Protocol::Http2 => b"h2".to_vec(),
        }];
        Ok(Self {
            port,
            protocol,
            tls: Arc::new(tls),
            body,
            answer_len: 0,
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        // The API server's call: POST <path>?timeout=<webhook timeout>, JSON both ways.
        let uri = match self.protocol {
            Protocol::Http1 => "/mutate?timeout=10s".to_owned(),
            Protocol::Http2 => format!("https://localhost:{}/mutate?timeout=10s", self.port),
        };
        Request::post(uri)
            .header(hyper::header::HOST, format!("localhost:{}", self.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json, */*")
            .header(hyper::header::USER_AGENT, "kube-apiserver-admission")
            .body(Full::new(self.body.clone()))
            .expect("a valid request")
    }
}

/// One keep-alive connection.
#[derive(Clone)]
pub enum Connection {
    Http1(Arc<tokio::sync::Mutex<http1::SendRequest<Full<Bytes>>>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

pub async fn connect(target: &Target) -> Result<Connection> {
    let tcp = TcpStream::connect(("127.0.0.1", target.port)).await?;
    tcp.set_nodelay(true)?; // as Go's net/http does
    let tls = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let io = TokioIo::new(tls);
    Ok(match target.protocol {
        Protocol::Http1 => {
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(connection);
            Connection::Http1(Arc::new(tokio::sync::Mutex::new(sender)))
        }
        Protocol::Http2 => {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Connection::Http2(sender)
        }
    })
}

/// Sends one review; `Ok(answer length)` for a 200 with a complete body.
pub async fn send(connection: &Connection, target: &Target) -> Result<usize> {
    let response = match connection {
        Connection::Http1(sender) => {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(target.request()).await?
        }
        Connection::Http2(sender) => sender.clone().send_request(target.request()).await?,
    };
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != hyper::StatusCode::OK {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    if target.answer_len != 0 && body.len() != target.answer_len {
        bail!(
            "answer of {} bytes, expected {}",
            body.len(),
            target.answer_len
        );
    }
    Ok(body.len())
}

/// Sends one review and checks the answer in full: an allowed AdmissionReview with a
/// JSONPatch. Returns the answer's length, which later answers must match.
pub async fn check(target: &Target) -> Result<usize> {
    let connection = connect(target).await?;
    let response = match &connection {
        Connection::Http1(sender) => sender.lock().await.send_request(target.request()).await?,
        Connection::Http2(sender) => sender.clone().send_request(target.request()).await?,
    };
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let review: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))?;
    if status != hyper::StatusCode::OK
        || review["response"]["allowed"] != true
        || review["response"]["patchType"] != "JSONPatch"
    {
        bail!("unexpected answer, HTTP {status}: {review}");
    }
    Ok(body.len())
}

/// What one run measured. Latencies in microseconds.
pub struct Measured {
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The measured window: the run (closed loop), or from the first measured scheduled
    /// time to the last answer (open loop), so a server that falls behind shows a lower rate.
    pub window: Duration,
    /// Open loop only: when the last measured answer arrived.
    last_answer: Option<Instant>,
    /// Open loop only: requests scheduled in the measured window.
    pub scheduled: u64,
    /// Open loop only: how late requests left the client after their scheduled time
    /// (client overhead plus, on HTTP/1.1, waiting for a free connection).
    pub send_lag: Histogram<u64>,
    /// Soak only: latency and outcomes per `window_len` of the measured time, by the
    /// requests' scheduled times.
    pub windows: Vec<Window>,
    window_len: Option<Duration>,
}

/// One window of a soak.
pub struct Window {
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
}

impl Measured {
    fn new() -> Self {
        let histogram = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
        Self {
            latency: histogram(),
            ok: 0,
            errors: 0,
            first_error: None,
            window: Duration::ZERO,
            last_answer: None,
            scheduled: 0,
            send_lag: histogram(),
            windows: Vec::new(),
            window_len: None,
        }
    }

    fn with_windows(window_len: Duration) -> Self {
        Self {
            window_len: Some(window_len),
            ..Self::new()
        }
    }

    /// Records a request scheduled `offset` after the measured start, into its window too.
    fn record_at(&mut self, offset: Duration, latency: Duration, outcome: &Result<usize>) {
        self.record(latency, outcome);
        let Some(window_len) = self.window_len else {
            return;
        };
        let index = (offset.as_secs_f64() / window_len.as_secs_f64()) as usize;
        while self.windows.len() <= index {
            self.windows.push(Window {
                latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
                ok: 0,
                errors: 0,
            });
        }
        let window = &mut self.windows[index];
        window
            .latency
            .saturating_record(latency.as_micros().clamp(1, 120_000_000) as u64);
        match outcome {
            Ok(_) if latency <= REQUEST_TIMEOUT => window.ok += 1,
            _ => window.errors += 1,
        }
    }

    fn record(&mut self, latency: Duration, outcome: &Result<usize>) {
        let micros = latency.as_micros().clamp(1, 120_000_000) as u64;
        self.latency.saturating_record(micros);
        match outcome {
            Ok(_) if latency <= REQUEST_TIMEOUT => self.ok += 1,
            Ok(_) => self.error(format!("answered after {latency:?}, past the timeout")),
            Err(error) => self.error(format!("{error:#}")),
        }
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        self.first_error.get_or_insert(message);
    }

    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }

    pub fn percentile(&self, quantile: f64) -> u64 {
        self.latency.value_at_quantile(quantile)
    }
}

/// Send times every 1/`rate` s from `start` until `end`, from a thread of its own: tokio's
/// timers tick in milliseconds, so the thread sleeps to each send time with a 1 µs timer
/// slack. `scheduled` counts those at or after `measure_from`.
pub struct Schedule {
    pub thread: std::thread::JoinHandle<()>,
    pub due: tokio::sync::mpsc::UnboundedReceiver<Instant>,
    pub scheduled: Arc<AtomicU64>,
}

impl Schedule {
    pub fn start(rate: u64, start: Instant, measure_from: Instant, end: Instant) -> Self {
        let (tx, due) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let scheduled = Arc::new(AtomicU64::new(0));
        let counter = scheduled.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: prctl with PR_SET_TIMERSLACK only sets this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64) };
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            for index in 0u32.. {
                let due = start + interval * index;
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if due >= measure_from {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(due).is_err() {
                    break;
                }
            }
        });
        Self {
            thread,
            due,
            scheduled,
        }
    }
}

/// `connections` HTTP/1.1 connections, or one HTTP/2 connection shared by as many streams.
async fn open_connections(target: &Target, connections: usize) -> Result<Vec<Connection>> {
    match target.protocol {
        Protocol::Http1 => {
            let mut opened = Vec::with_capacity(connections);
            for _ in 0..connections {
                opened.push(connect(target).await?);
            }
            Ok(opened)
        }
        Protocol::Http2 => Ok(vec![connect(target).await?; connections]),
    }
}

/// Closed loop: `concurrency` requests in flight at all times, for `warmup` unmeasured and
/// then `duration` measured.
pub async fn closed_loop(
    target: &Target,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured> {
    let connections = open_connections(target, concurrency).await?;
    let measured = Arc::new(Mutex::new(Measured::new()));
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let mut workers = JoinSet::new();
    for connection in connections {
        let (target, measured) = (target.clone(), measured.clone());
        workers.spawn(async move {
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let outcome = send(&connection, &target).await;
                let done = Instant::now();
                if done >= measure_from && done < end {
                    measured.lock().unwrap().record(done - started, &outcome);
                }
                if outcome.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let mut measured = take(measured)?;
    measured.window = duration;
    Ok(measured)
}

/// Open loop: requests scheduled every 1/`rate` s for `warmup` + `duration`, sent whatever
/// the answers do; only those scheduled after the warm-up are measured, from their scheduled
/// time. HTTP/1.1 sends on the first free of `connections` connections; HTTP/2 opens a
/// stream per request on one connection. Requests still open 10 s after the schedule ends
/// are counted as errors (timeouts).
pub async fn open_loop(
    target: &Target,
    connections: usize,
    rate: u64,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured> {
    let opened = open_connections(target, connections).await?;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let schedule_end = measure_from + duration;
    let Schedule {
        thread: scheduler,
        due: rx,
        scheduled,
    } = Schedule::start(rate, start, measure_from, schedule_end);
    let measured = Arc::new(Mutex::new(Measured::new()));
    let mut in_flight = JoinSet::new();
    let finish =
        move |due: Instant, sent: Instant, outcome: Result<usize>, measured: &Mutex<Measured>| {
            if due >= measure_from {
                let mut measured = measured.lock().unwrap();
                let answered = Instant::now();
                measured.record(answered - due, &outcome);
                measured.last_answer = Some(answered);
                let lag = (sent - due).as_micros().max(1) as u64;
                measured.send_lag.saturating_record(lag);
            }
        };
    match target.protocol {
        Protocol::Http1 => {
            let queue = Arc::new(tokio::sync::Mutex::new(rx));
            for connection in opened {
                let (target, queue, measured) = (target.clone(), queue.clone(), measured.clone());
                in_flight.spawn(async move {
                    loop {
                        let Some(due) = queue.lock().await.recv().await else {
                            break;
                        };
                        let sent = Instant::now();
                        let outcome = send(&connection, &target).await;
                        finish(due, sent, outcome, &measured);
                    }
                });
            }
        }
        Protocol::Http2 => {
            let connection = opened.into_iter().next().expect("one connection");
            let (target, measured) = (target.clone(), measured.clone());
            in_flight.spawn(async move {
                let mut rx = rx;
                let mut streams = JoinSet::new();
                while let Some(due) = rx.recv().await {
                    let (connection, target, measured) =
                        (connection.clone(), target.clone(), measured.clone());
                    streams.spawn(async move {
                        let sent = Instant::now();
                        let outcome = send(&connection, &target).await;
                        finish(due, sent, outcome, &measured);
                    });
                    // Reap finished streams as we go so the set stays small.
                    while streams.try_join_next().is_some() {}
                }
                while streams.join_next().await.is_some() {}
            });
        }
    }
    let deadline = tokio::time::Instant::from_std(schedule_end + REQUEST_TIMEOUT);
    let drained = tokio::time::timeout_at(deadline, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        in_flight.abort_all();
        while in_flight.join_next().await.is_some() {}
    }
    scheduler
        .join()
        .map_err(|_| anyhow!("the scheduler thread panicked"))?;
    let mut measured = take(measured)?;
    measured.window = measured
        .last_answer
        .map_or(duration, |last| duration.max(last - measure_from));
    measured.scheduled = scheduled.load(Ordering::Relaxed);
    // Scheduled but never answered within the deadline: timeouts.
    let unanswered = measured
        .scheduled
        .saturating_sub(measured.ok + measured.errors);
    if unanswered > 0 {
        measured.errors += unanswered;
        measured.first_error.get_or_insert(format!(
            "{unanswered} requests unanswered {REQUEST_TIMEOUT:?} after the schedule ended"
        ));
    }
    Ok(measured)
}

/// The results, leaving an empty record to any aborted task that still holds a reference.
fn take(measured: Arc<Mutex<Measured>>) -> Result<Measured> {
    let mut measured = measured
        .lock()
        .map_err(|_| anyhow!("a request task panicked"))?;
    Ok(std::mem::replace(&mut *measured, Measured::new()))
}

/// A soak: open loop at `rate` over `connections` HTTP/2 connections (streams spread over
/// them in turn), the bodies of `targets` in turn, for `warmup` unmeasured and `duration`
/// measured, with latency and errors per `window`. Every `recycle_every` one connection is
/// replaced by a new one (a new TLS handshake, as API server replicas come and go), opened
/// beside the old one so that no request waits for it; the old one finishes its streams.
pub async fn soak(
    targets: &[Target],
    connections: usize,
    rate: u64,
    warmup: Duration,
    duration: Duration,
    window: Duration,
    recycle_every: Duration,
) -> Result<(Measured, usize)> {
    let first = targets.first().context("no bodies to send")?;
    anyhow::ensure!(first.protocol == Protocol::Http2, "the soak speaks HTTP/2");
    let mut pool = Vec::with_capacity(connections);
    for _ in 0..connections {
        pool.push(connect(first).await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let schedule_end = measure_from + duration;
    let Schedule {
        thread: scheduler,
        due: mut rx,
        scheduled,
    } = Schedule::start(rate, start, measure_from, schedule_end);
    let measured = Arc::new(Mutex::new(Measured::with_windows(window)));
    let (fresh_tx, mut fresh_rx) = tokio::sync::mpsc::channel::<Result<Connection>>(1);
    let mut next_recycle = start + recycle_every;
    let mut recycled = 0usize;
    let mut streams = JoinSet::new();
    let mut index = 0usize;
    while let Some(due) = rx.recv().await {
        if due >= next_recycle {
            next_recycle += recycle_every;
            let (target, fresh_tx) = (first.clone(), fresh_tx.clone());
            tokio::spawn(async move {
                let _ = fresh_tx.send(connect(&target).await).await;
            });
        }
        if let Ok(fresh) = fresh_rx.try_recv() {
            pool[recycled % connections] =
                fresh.context("a new connection during the soak failed")?;
            recycled += 1;
        }
        let connection = pool[index % connections].clone();
        let target = targets[index % targets.len()].clone();
        index += 1;
        let measured = measured.clone();
        streams.spawn(async move {
            let sent = Instant::now();
            let outcome = send(&connection, &target).await;
            if due >= measure_from {
                let answered = Instant::now();
                let mut measured = measured.lock().unwrap();
                measured.record_at(due - measure_from, answered - due, &outcome);
                measured.last_answer = Some(answered);
                let lag = (sent - due).as_micros().max(1) as u64;
                measured.send_lag.saturating_record(lag);
            }
        });
        while streams.try_join_next().is_some() {}
    }
    let deadline = tokio::time::Instant::from_std(schedule_end + REQUEST_TIMEOUT);
    let drained = tokio::time::timeout_at(deadline, async {
        while streams.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        streams.abort_all();
        while streams.join_next().await.is_some() {}
    }
    scheduler
        .join()
        .map_err(|_| anyhow!("the scheduler thread panicked"))?;
    let mut measured = take(measured)?;
    measured.window = measured
        .last_answer
        .map_or(duration, |last| duration.max(last - measure_from));
    measured.scheduled = scheduled.load(Ordering::Relaxed);
    let unanswered = measured
        .scheduled
        .saturating_sub(measured.ok + measured.errors);
    if unanswered > 0 {
        measured.errors += unanswered;
        measured.first_error.get_or_insert(format!(
            "{unanswered} requests unanswered {REQUEST_TIMEOUT:?} after the schedule ended"
        ));
    }
    Ok((measured, recycled))
}
