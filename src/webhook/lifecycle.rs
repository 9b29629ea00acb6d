//! The server's life: readiness (ready only while the served certificate is trusted, never
//! again once shutdown began), the termination signal, and the delay before draining.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What `/readyz` answers. Cheap to clone; every clone shares one state, and only these
/// methods change it.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Read by every `/readyz`; written only under `gate`.
    ready: AtomicBool,
    gate: Mutex<Gate>,
    /// Wakes [`Readiness::stopping`] when [`Readiness::stop`] is called.
    stopped: tokio::sync::Notify,
}

#[derive(Default)]
struct Gate {
    trusted: bool,
    stopping: bool,
}

impl Readiness {
    /// Not ready until [`set_trusted`](Self::set_trusted) says the certificate is trusted.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Records whether the served certificate is trusted; returns whether that changed.
    pub fn set_trusted(&self, trusted: bool) -> bool {
        let mut gate = self.gate();
        let changed = gate.trusted != trusted;
        gate.trusted = trusted;
        if !gate.stopping {
            self.inner.ready.store(trusted, Ordering::Release);
        }
        changed
    }

    pub fn trusted(&self) -> bool {
        self.gate().trusted
    }

    /// Not ready from now on, whatever certificate checks say (a late check must not undo
    /// the drain).
    pub fn stop(&self) {
        let mut gate = self.gate();
        gate.stopping = true;
        self.inner.ready.store(false, Ordering::Release);
        self.inner.stopped.notify_waiters();
    }

    /// Resolves once [`stop`](Self::stop) was called (at once if it already was).
    pub async fn stopping(&self) {
        loop {
            let notified = self.inner.stopped.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.gate().stopping {
                return;
            }
            notified.await;
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.inner.gate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
pub async fn termination_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Resolves when the server should start draining: on the termination signal it reports
/// not ready at once, then waits `delay` so that endpoints drop this pod before the server
/// stops accepting connections.
pub async fn shutdown(readiness: Readiness, delay: Duration) {
    termination_signal().await;
    readiness.stop();
    if !delay.is_zero() {
        tracing::info!(delay = ?delay, "shutting down: not ready, waiting before draining");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_trust_until_shutdown() {
        let readiness = Readiness::new();
        assert!(!readiness.is_ready(), "not ready before the first check");
        assert!(readiness.set_trusted(true));
        assert!(readiness.is_ready());
        assert!(!readiness.set_trusted(true));
        readiness.stop();
        assert!(!readiness.is_ready());
        readiness.set_trusted(true);
        assert!(!readiness.is_ready(), "a check after shutdown began");
        assert!(readiness.trusted());
    }

    #[tokio::test]
    async fn stopping_resolves_when_stop_is_called_and_after() {
        let readiness = Readiness::new();
        let waiting = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.stopping().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "resolved before stop");
        readiness.stop();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("stopping resolves on stop")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), readiness.stopping())
            .await
            .expect("stopping resolves at once once stopped");
    }
}
