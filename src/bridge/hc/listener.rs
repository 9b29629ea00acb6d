//! A listener's control channel: connect, accept, renew, ping, reconnect.
//!
//! As in Microsoft.Azure.Relay's `HybridConnectionListener.ControlConnection`: a lost channel
//! is reconnected (kips: capped exponential backoff with jitter instead of the fixed
//! 0/1/2/5/10/30 s steps); 404 ends the listener (the hybrid connection does not exist), and
//! so do 401 and 403 (the credentials are refused). The token is renewed on the open
//! channel with `renewToken` before it expires (the service closes the channel with 1008
//! when it does).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::messages::{Accept, ControlMessage, RenewToken};
use super::{Action, ConnectError, HcClient, Refusal, tracking_id};
use crate::bridge::backoff::Backoff;
use crate::bridge::ws::{TextOrControl, WsError, WsReceiver, WsSender};

/// Where a listener reports whether it is online.
#[derive(Clone)]
pub(crate) struct Status {
    pub online: Arc<AtomicBool>,
    pub gauge: prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl Status {
    fn set(&self, online: bool) {
        self.online.store(online, Ordering::SeqCst);
        self.gauge.set(i64::from(online));
    }
}

/// The listener's settings.
pub(crate) struct ListenerOptions {
    pub entity: String,
    pub keepalive: Duration,
    pub backoff: Backoff,
}

/// Why a session on the control channel ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Runs the listener until `shutdown` turns true (Ok) or the relay refuses it for good.
pub(crate) async fn run(
    client: HcClient,
    mut options: ListenerOptions,
    status: Status,
    on_accept: impl Fn(Accept) + Send + Sync + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Refusal> {
    let id = tracking_id();
    let on_accept = Arc::new(on_accept);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let attempt = tokio::select! {
            attempt = client.open_entity(&options.entity, Action::Listen, &id) => attempt,
            _ = shutdown.changed() => return Ok(()),
        };
        let delay = match attempt {
            Ok((receiver, sender)) => {
                info!(relay = %options.entity, "listener online");
                status.set(true);
                options.backoff.reset();
                let end = session(
                    &client,
                    &options,
                    receiver,
                    sender,
                    on_accept.clone(),
                    &mut shutdown,
                )
                .await;
                status.set(false);
                match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost(reason) => {
                        warn!(relay = %options.entity, %reason, "listener offline; reconnecting");
                    }
                }
                // The first attempt after a loss goes out soon, but not in lockstep with
                // every other listener that lost the relay at the same moment.
                options.backoff.next_delay().mul_f64(0.5)
            }
            Err(ConnectError::Refused(refusal)) if refusal.is_fatal() => return Err(refusal),
            Err(error) => {
                let delay = options.backoff.next_delay();
                warn!(relay = %options.entity, %error, retry_in = ?delay, "listener cannot reach the relay");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// When to renew a token: at 80 % of its life (and never sooner than a second from now).
fn renew_at(issued: SystemTime, expires: SystemTime) -> Instant {
    let life = expires.duration_since(issued).unwrap_or_default();
    let wait = life.mul_f64(0.8).max(Duration::from_secs(1));
    Instant::now() + wait
}

async fn session(
    client: &HcClient,
    options: &ListenerOptions,
    mut receiver: WsReceiver,
    sender: WsSender,
    on_accept: Arc<impl Fn(Accept) + Send + Sync + 'static>,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    // Reading is not cancel-safe: a task reads, the session selects on its messages.
    let (events, mut incoming) = mpsc::channel::<Result<TextOrControl, WsError>>(16);
    let reader = tokio::spawn(async move {
        loop {
            let event = receiver.next_text().await;
            let stop = !matches!(event, Ok(TextOrControl::Text(_) | TextOrControl::Pong));
            if events.send(event).await.is_err() || stop {
                return;
            }
        }
    });
    let renewable = client.tokens.renewable();
    let mut next_renewal = if renewable {
        Some(renew_at(
            SystemTime::now(),
            SystemTime::now() + client.tokens.lifetime(),
        ))
    } else {
        None
    };
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + options.keepalive,
        options.keepalive,
    );
    let mut last_heard = Instant::now();
    let end = loop {
        let renewal = async {
            match next_renewal {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = incoming.recv() => {
                last_heard = Instant::now();
                match event {
                    Some(Ok(TextOrControl::Text(text))) => match ControlMessage::parse(&text) {
                        Ok(ControlMessage::Accept(accept)) => {
                            debug!(relay = %options.entity, id = %accept.id, "accept");
                            on_accept(accept);
                        }
                        Ok(_) => debug!(relay = %options.entity, "ignoring a control message"),
                        Err(error) => warn!(relay = %options.entity, %error, "unreadable control message"),
                    },
                    Some(Ok(TextOrControl::Pong)) => {}
                    Some(Ok(TextOrControl::Close { code, reason })) => {
                        break SessionEnd::Lost(format!(
                            "the relay closed the control channel ({}{reason})",
                            code.map(|c| format!("{c} ")).unwrap_or_default()
                        ));
                    }
                    Some(Err(error)) => break SessionEnd::Lost(error.to_string()),
                    None => break SessionEnd::Lost("the control channel ended".into()),
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > options.keepalive * 2 {
                    break SessionEnd::Lost(format!("no answer to pings for {:?}", last_heard.elapsed()));
                }
                if let Err(error) = sender.ping().await {
                    break SessionEnd::Lost(error.to_string());
                }
            }
            _ = renewal => {
                let token = client.tokens.token(&options.entity);
                let message = ControlMessage::RenewToken(RenewToken {
                    token: token.text.expose().to_owned(),
                });
                if let Err(error) = sender.send_text(&message.to_json()).await {
                    break SessionEnd::Lost(error.to_string());
                }
                debug!(relay = %options.entity, "token renewed");
                next_renewal = token.expires.map(|expires| renew_at(SystemTime::now(), expires));
            }
            _ = shutdown.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), sender.close(1000, "Normal Closure")).await;
                break SessionEnd::Shutdown;
            }
        }
    };
    reader.abort();
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_renewed_at_four_fifths_of_their_life() {
        let now = SystemTime::now();
        let at = renew_at(now, now + Duration::from_secs(3600));
        let wait = at - Instant::now();
        assert!(
            wait > Duration::from_secs(2870) && wait <= Duration::from_secs(2880),
            "{wait:?}"
        );
        let short = renew_at(now, now) - Instant::now();
        assert!(short <= Duration::from_secs(1));
    }
}
