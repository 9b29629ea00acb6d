//! When to renew what: the certificate life cycle as a pure function of the Secret's
//! certificates and the clock, and the renewal itself.
//!
//! The serving certificate is renewed two thirds into its life. The CA is rotated the same
//! way, in three steps spread over time so that the API server trusts every certificate
//! any replica may be serving at any moment:
//!
//! 1. **Introduce**: a new CA becomes the signer and joins the trust bundle (`ca.crt`, which
//!    replicas copy into the webhook configuration's `caBundle`). The serving certificate,
//!    signed by the old CA, stays.
//! 2. **Switch**: once the new CA has been in the bundle for the overlap, a serving
//!    certificate signed by it replaces the old one.
//! 3. **Retire**: once that serving certificate has been out for the overlap (every replica
//!    re-reads the Secret well within it), the old CA leaves the bundle.
//!
//! The overlap must cover the interval at which replicas re-read the Secret plus the time
//! the API server takes to see a new `caBundle` (seconds). A replica that read the Secret
//! just before a change may even write the previous bundle back once, and corrects it at
//! its next check; hence [`Policy::validate`] asks for at least two check intervals.

use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use super::bundle::{CertInfo, bundle_pem, parse_pem_certs, with_ca};
use super::layout::{CertSecret, IssuedBy, View};
use crate::tls::{self, PemPair};

/// Lifetimes and timing of the certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub serving_validity: Duration,
    pub ca_validity: Duration,
    /// How long a new CA is trusted before it signs, and an old one after it stopped.
    pub overlap: Duration,
}

impl Policy {
    /// Checks that the timings can work together; `check_interval` is how often replicas
    /// re-read the Secret.
    pub fn validate(&self, check_interval: Duration) -> Result<()> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if self.overlap < check_interval * 2 {
            bail!(
                "the rotation overlap ({}) must be at least twice the certificate check interval ({}): replicas pick up a new certificate only that often",
                show(self.overlap),
                show(check_interval)
            );
        }
        if self.overlap * 3 > self.serving_validity {
            bail!(
                "the serving certificate validity ({}) must be at least three times the rotation overlap ({})",
                show(self.serving_validity),
                show(self.overlap)
            );
        }
        if self.ca_validity < self.serving_validity * 2 {
            bail!(
                "the CA validity ({}) must be at least twice the serving certificate validity ({})",
                show(self.ca_validity),
                show(self.serving_validity)
            );
        }
        Ok(())
    }
}

/// A renewal asked for by a person (`kips certs rotate`), not by the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    Serving,
    Ca,
}

/// What to do with the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// It is fine as it is; `until` is when the plan changes next (if known).
    Keep { until: Option<SystemTime> },
    /// Start over: a new CA and serving certificate (no Secret, or one kips cannot use).
    Create,
    /// Introduce a new CA: it signs from now on and joins the trust bundle.
    IntroduceCa,
    /// A new serving certificate from the signer, for these names.
    RenewServing { names: Vec<String> },
    /// Trust exactly these CAs.
    SetBundle(Vec<CertInfo>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub step: Step,
    /// Why, for the logs.
    pub reason: String,
}

impl Plan {
    fn new(step: Step, reason: impl Into<String>) -> Self {
        Self {
            step,
            reason: reason.into(),
        }
    }
}

fn at(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The next step for a Secret whose certificates are `view`, for a replica that needs the
/// serving certificate to carry `names`.
pub fn plan(view: &View, names: &[String], policy: &Policy, now: SystemTime) -> Plan {
    let View {
        serving, signer, ..
    } = view;
    if signer.expired(now) {
        return Plan::new(
            Step::Create,
            format!("the CA expired at {}", at(signer.not_after)),
        );
    }
    if !view.bundle.iter().any(|ca| ca.der == signer.der) {
        return Plan::new(
            Step::SetBundle(with_ca(&view.bundle, signer)),
            "the trust bundle lacks the signing CA",
        );
    }
    match view.serving_issued_by {
        IssuedBy::Untrusted => {
            return Plan::new(
                Step::RenewServing {
                    names: names_for(serving, names),
                },
                "the serving certificate was not issued by a CA of the trust bundle",
            );
        }
        IssuedBy::OtherTrusted => {
            let switch_at = signer.issued_at() + policy.overlap;
            return if now >= switch_at || serving.expired(now) {
                Plan::new(
                    Step::RenewServing {
                        names: names_for(serving, names),
                    },
                    "CA rotation: the new CA has been trusted long enough to sign",
                )
            } else {
                Plan::new(
                    Step::Keep {
                        until: Some(switch_at),
                    },
                    format!(
                        "CA rotation: the new CA signs from {} on, once the API server trusts it",
                        at(switch_at)
                    ),
                )
            };
        }
        IssuedBy::Signer => {}
    }
    if now >= signer.renew_at() {
        return Plan::new(
            Step::IntroduceCa,
            format!(
                "the CA is due for rotation (expires {})",
                at(signer.not_after)
            ),
        );
    }
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !serving.names.contains(n))
        .collect();
    if !missing.is_empty() {
        return Plan::new(
            Step::RenewServing {
                names: names_for(serving, names),
            },
            format!("the serving certificate lacks {missing:?}"),
        );
    }
    if now >= serving.renew_at() {
        return Plan::new(
            Step::RenewServing {
                names: names.to_vec(),
            },
            format!(
                "the serving certificate is due for renewal (expires {})",
                at(serving.not_after)
            ),
        );
    }
    let retired: Vec<&CertInfo> = view
        .bundle
        .iter()
        .filter(|ca| ca.der != signer.der)
        .collect();
    if !retired.is_empty() {
        let retire_at = serving.issued_at() + policy.overlap;
        if now >= retire_at {
            return Plan::new(
                Step::SetBundle(vec![signer.clone()]),
                format!("retiring {} CA(s) that no longer sign", retired.len()),
            );
        }
        let unexpired: Vec<CertInfo> = view
            .bundle
            .iter()
            .filter(|ca| !ca.expired(now))
            .cloned()
            .collect();
        if unexpired.len() < view.bundle.len() {
            return Plan::new(Step::SetBundle(unexpired), "dropping expired CAs");
        }
        return Plan::new(
            Step::Keep {
                until: Some(retire_at),
            },
            format!("the previous CA stays trusted until {}", at(retire_at)),
        );
    }
    let until = serving.renew_at().min(signer.renew_at());
    Plan::new(
        Step::Keep { until: Some(until) },
        format!("certificates are current; next renewal at {}", at(until)),
    )
}

/// A renewal a person asked for while the clock is in the middle of a CA rotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a CA rotation is under way (the trust bundle holds {cas} CAs); the webhook finishes it on its own, try again afterwards"
)]
pub struct RotationUnderWay {
    cas: usize,
}

/// The step a person asked for, unless a CA rotation is under way (then the clock finishes
/// it first, and the request is refused with the reason).
pub fn forced(view: &View, force: Force, now: SystemTime) -> Result<Plan, RotationUnderWay> {
    if view.serving_issued_by == IssuedBy::OtherTrusted
        || view
            .bundle
            .iter()
            .any(|ca| ca.der != view.signer.der && !ca.expired(now))
    {
        return Err(RotationUnderWay {
            cas: view.bundle.len(),
        });
    }
    Ok(match force {
        Force::Serving => Plan::new(
            Step::RenewServing {
                names: view.serving.names.clone(),
            },
            "renewal of the serving certificate requested",
        ),
        Force::Ca => Plan::new(Step::IntroduceCa, "CA rotation requested"),
    })
}

/// The names a new serving certificate needs: what this replica wants plus what the current
/// one has, so that replicas configured with different names (during an upgrade) converge
/// on one certificate instead of taking turns.
fn names_for(serving: &CertInfo, wanted: &[String]) -> Vec<String> {
    let mut names = wanted.to_vec();
    for name in &serving.names {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The common name of a new CA: dated, so that `kips certs status` and a bundle with two
/// CAs tell them apart.
pub fn ca_common_name(now: SystemTime) -> String {
    format!("kips webhook CA {}", at(now))
}

/// A fresh CA and serving certificate.
pub fn create(names: &[String], policy: &Policy, now: SystemTime) -> Result<CertSecret> {
    let signer = tls::generate_ca(&ca_common_name(now), policy.ca_validity)?;
    let serving = tls::issue_serving_cert(&signer, names, policy.serving_validity)?;
    Ok(CertSecret {
        serving,
        trust_bundle: signer.cert.clone(),
        signer,
    })
}

/// Carries out `step` on `current` (whose certificates are `view`). `Keep` returns it as is.
pub fn apply(
    step: &Step,
    current: &CertSecret,
    view: &View,
    policy: &Policy,
    now: SystemTime,
) -> Result<CertSecret> {
    let mut next = current.clone();
    match step {
        Step::Keep { .. } => {}
        Step::Create => {
            let names = if view.serving.names.is_empty() {
                vec!["localhost".to_owned()]
            } else {
                view.serving.names.clone()
            };
            next = create(&names, policy, now)?;
        }
        Step::IntroduceCa => {
            let signer = tls::generate_ca(&ca_common_name(now), policy.ca_validity)?;
            let info = parse_pem_certs(&signer.cert)?.remove(0);
            next.trust_bundle = bundle_pem(&with_ca(&view.bundle, &info));
            next.signer = signer;
        }
        Step::RenewServing { names } => {
            next.serving = issue(&current.signer, &view.signer, names, policy, now)?;
        }
        Step::SetBundle(cas) => next.trust_bundle = bundle_pem(cas),
    }
    Ok(next)
}

/// A serving certificate that never outlives the CA that signs it.
fn issue(
    signer: &PemPair,
    signer_info: &CertInfo,
    names: &[String],
    policy: &Policy,
    now: SystemTime,
) -> Result<PemPair> {
    let ca_left = signer_info
        .not_after
        .duration_since(now)
        .unwrap_or_default();
    tls::issue_serving_cert(signer, names, policy.serving_validity.min(ca_left))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const POLICY: Policy = Policy {
        serving_validity: Duration::from_secs(90 * 86_400),
        ca_validity: Duration::from_secs(1095 * 86_400),
        overlap: Duration::from_secs(600),
    };

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn cert(tag: u8, made: SystemTime, life: Duration, names: &[&str]) -> CertInfo {
        CertInfo {
            der: vec![tag],
            subject: format!("cert {tag}"),
            issuer: String::new(),
            not_before: made - crate::certs::bundle::BACKDATE,
            not_after: made + life,
            is_ca: names.is_empty(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn names() -> Vec<String> {
        vec!["kips.kips-system.svc".to_owned()]
    }

    /// A Secret made at t0: CA 1, serving certificate signed by it.
    fn fresh() -> View {
        let ca = cert(1, t0(), POLICY.ca_validity, &[]);
        View {
            serving: cert(10, t0(), POLICY.serving_validity, &["kips.kips-system.svc"]),
            bundle: vec![ca.clone()],
            signer: ca,
            serving_issued_by: IssuedBy::Signer,
        }
    }

    fn step_at(view: &View, now: SystemTime) -> Step {
        plan(view, &names(), &POLICY, now).step
    }

    #[test]
    fn a_fresh_secret_is_kept_until_two_thirds_of_the_serving_life() {
        let view = fresh();
        // The life includes the backdating: (90 days + 5 min) * 2/3 from notBefore.
        let renew = t0() + 60 * DAY - crate::certs::bundle::BACKDATE / 3;
        assert_eq!(view.serving.renew_at(), renew);
        assert_eq!(
            step_at(&view, t0() + DAY),
            Step::Keep { until: Some(renew) }
        );
        assert_eq!(
            step_at(&view, view.serving.renew_at() - Duration::from_secs(1)),
            Step::Keep {
                until: Some(view.serving.renew_at())
            }
        );
        assert_eq!(
            step_at(&view, view.serving.renew_at()),
            Step::RenewServing { names: names() }
        );
    }

    #[test]
    fn a_missing_name_is_added_to_the_existing_ones() {
        let view = fresh();
        let wanted = vec!["127.0.0.1".to_owned()];
        assert_eq!(
            plan(&view, &wanted, &POLICY, t0() + DAY).step,
            Step::RenewServing {
                names: vec!["127.0.0.1".to_owned(), "kips.kips-system.svc".to_owned()]
            }
        );
    }

    #[test]
    fn the_ca_rotates_in_three_steps_separated_by_the_overlap() {
        let old = fresh();
        let due = old.signer.renew_at();
        assert_eq!(step_at(&old, due), Step::IntroduceCa);

        // 1. introduced: new signer in the bundle, serving still from the old CA.
        let new_ca = cert(2, due, POLICY.ca_validity, &[]);
        let introduced = View {
            signer: new_ca.clone(),
            bundle: vec![old.signer.clone(), new_ca.clone()],
            serving_issued_by: IssuedBy::OtherTrusted,
            serving: cert(
                11,
                due - 10 * DAY,
                POLICY.serving_validity,
                &["kips.kips-system.svc"],
            ),
        };
        let switch_at = due + POLICY.overlap;
        assert_eq!(
            step_at(&introduced, switch_at - Duration::from_secs(1)),
            Step::Keep {
                until: Some(switch_at)
            }
        );
        // 2. switch: a serving certificate from the new CA.
        assert_eq!(
            step_at(&introduced, switch_at),
            Step::RenewServing { names: names() }
        );
        let switched = View {
            serving: cert(
                12,
                switch_at,
                POLICY.serving_validity,
                &["kips.kips-system.svc"],
            ),
            serving_issued_by: IssuedBy::Signer,
            ..introduced.clone()
        };
        let retire_at = switch_at + POLICY.overlap;
        assert_eq!(
            step_at(&switched, retire_at - Duration::from_secs(1)),
            Step::Keep {
                until: Some(retire_at)
            }
        );
        // 3. retire: only the new CA stays trusted.
        assert_eq!(
            step_at(&switched, retire_at),
            Step::SetBundle(vec![new_ca.clone()])
        );
    }

    #[test]
    fn broken_states_are_repaired_at_once() {
        let mut untrusted = fresh();
        untrusted.serving_issued_by = IssuedBy::Untrusted;
        assert_eq!(
            step_at(&untrusted, t0() + DAY),
            Step::RenewServing { names: names() }
        );

        let mut no_signer_in_bundle = fresh();
        let other = cert(3, t0(), POLICY.ca_validity, &[]);
        no_signer_in_bundle.bundle = vec![other.clone()];
        assert_eq!(
            step_at(&no_signer_in_bundle, t0() + DAY),
            Step::SetBundle(vec![other, no_signer_in_bundle.signer.clone()])
        );

        let expired = fresh();
        assert_eq!(step_at(&expired, expired.signer.not_after), Step::Create);
    }

    #[test]
    fn an_expired_extra_ca_is_dropped_before_the_overlap_ends() {
        let mut view = fresh();
        let stale = cert(4, t0() - 400 * DAY, 400 * DAY + DAY, &[]);
        view.bundle.push(stale);
        view.serving = cert(
            13,
            t0() + 2 * DAY,
            POLICY.serving_validity,
            &["kips.kips-system.svc"],
        );
        let now = t0() + 2 * DAY;
        assert_eq!(
            step_at(&view, now),
            Step::SetBundle(vec![view.signer.clone()])
        );
    }

    #[test]
    fn forced_renewals_wait_for_a_rotation_under_way() {
        let view = fresh();
        assert_eq!(
            forced(&view, Force::Serving, t0()).unwrap().step,
            Step::RenewServing { names: names() }
        );
        assert_eq!(
            forced(&view, Force::Ca, t0()).unwrap().step,
            Step::IntroduceCa
        );
        let mut rotating = fresh();
        rotating.bundle.push(cert(5, t0(), POLICY.ca_validity, &[]));
        let refusal = forced(&rotating, Force::Ca, t0()).unwrap_err().to_string();
        assert!(refusal.contains("CA rotation is under way"), "{refusal}");
    }

    #[test]
    fn policies_that_cannot_work_are_refused_with_the_reason() {
        POLICY.validate(Duration::from_secs(30)).unwrap();
        let err = POLICY.validate(Duration::from_secs(400)).unwrap_err();
        assert!(
            err.to_string()
                .contains("at least twice the certificate check interval"),
            "{err}"
        );
        let short = Policy {
            serving_validity: Duration::from_secs(1200),
            ..POLICY
        };
        assert!(
            short
                .validate(Duration::from_secs(1))
                .unwrap_err()
                .to_string()
                .contains("three times")
        );
        let ca = Policy {
            ca_validity: 100 * DAY,
            ..POLICY
        };
        assert!(
            ca.validate(Duration::from_secs(1))
                .unwrap_err()
                .to_string()
                .contains("CA validity")
        );
    }

    #[test]
    fn applying_steps_makes_real_certificates_that_follow_the_plan() {
        let policy = Policy {
            serving_validity: Duration::from_secs(3600),
            ca_validity: Duration::from_secs(7200),
            overlap: Duration::from_secs(60),
        };
        let now = SystemTime::now();
        let secret = create(&names(), &policy, now).unwrap();
        let view = secret.inspect().unwrap();
        assert_eq!(view.serving_issued_by, IssuedBy::Signer);
        assert_eq!(view.serving.names, names());

        let introduced = apply(&Step::IntroduceCa, &secret, &view, &policy, now).unwrap();
        let v = introduced.inspect().unwrap();
        assert_eq!(v.bundle.len(), 2);
        assert_eq!(v.serving_issued_by, IssuedBy::OtherTrusted);
        assert_eq!(introduced.serving, secret.serving);
        assert_ne!(v.signer, view.signer);

        let step = Step::RenewServing { names: names() };
        let switched = apply(&step, &introduced, &v, &policy, now).unwrap();
        let v = switched.inspect().unwrap();
        assert_eq!(v.serving_issued_by, IssuedBy::Signer);

        let retired = apply(
            &Step::SetBundle(vec![v.signer.clone()]),
            &switched,
            &v,
            &policy,
            now,
        )
        .unwrap();
        let v = retired.inspect().unwrap();
        assert_eq!(v.bundle, vec![v.signer.clone()]);
        // A serving certificate never outlives its CA.
        assert!(v.serving.not_after <= v.signer.not_after);
    }
}
