//! Which kips annotations a workload's pods get: one rule, used by the webhook (to copy them
//! into the pod template) and by the developer's commands (to mirror them on the laptop).
//!
//! A workload carries kips annotations in two places. Those on its metadata are the user's
//! request; the webhook copies them, normalised, into the pod template and lists the copies in
//! `kips.io/copied`. Those a user wrote into the template directly (the GitOps way) belong to
//! the user and win over the metadata's. Copies stand for the metadata, which is read instead
//! (a stale copy of a removed annotation counts for nothing).

use std::collections::{BTreeMap, BTreeSet};

use super::grammar::{AnnotationError, KipsAnnotations, copied_keys, normalise};
use super::{COPIED, PREFIX, USER_KEYS, is_bookkeeping};

/// The kips annotations of one workload, sorted by where they come from. Pure; borrows the
/// object's annotation maps.
#[derive(Debug, Default)]
pub struct WorkloadAnnotations<'a> {
    /// Every `kips.io/*` key of the workload's metadata (bookkeeping keys included, which
    /// do not belong there).
    metadata: Vec<(&'a str, &'a str)>,
    /// Every `kips.io/*` key of the pod template as it is now (copies included).
    template: BTreeMap<&'a str, &'a str>,
    /// The keys kips copied into the template (`kips.io/copied`).
    copied: BTreeSet<String>,
}

/// Why a workload's annotations cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} are invalid: {}", place(*.from_template), join(.errors))]
pub struct InvalidAnnotations {
    /// Whether any of them came from the pod template.
    pub from_template: bool,
    pub errors: Vec<AnnotationError>,
}

fn place(from_template: bool) -> &'static str {
    if from_template {
        "the workload's kips annotations (metadata and pod template)"
    } else {
        "the workload's kips annotations"
    }
}

fn join(errors: &[AnnotationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the webhook writes into a workload's pod template.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copies {
    /// Normalised values of the metadata's user keys that the template does not set itself.
    pub values: BTreeMap<&'static str, String>,
    /// Keys set on both, with different values: the template's is used.
    pub conflicts: Vec<String>,
}

impl<'a> WorkloadAnnotations<'a> {
    pub fn new(
        metadata: impl IntoIterator<Item = (&'a str, &'a str)>,
        template: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let kips = |(k, _): &(&str, &str)| k.starts_with(PREFIX);
        let template: BTreeMap<&str, &str> = template.into_iter().filter(kips).collect();
        let copied = copied_keys(template.get(COPIED).copied());
        Self {
            metadata: metadata.into_iter().filter(kips).collect(),
            template,
            copied,
        }
    }

    /// The workload carries nothing of kips, in either place.
    pub fn is_empty(&self) -> bool {
        self.metadata.is_empty() && self.copied.is_empty() && self.user_template().next().is_none()
    }

    pub fn metadata(&self) -> &[(&'a str, &'a str)] {
        &self.metadata
    }

    /// The template's kips keys as they are now, copies and bookkeeping included.
    pub fn template(&self) -> &BTreeMap<&'a str, &'a str> {
        &self.template
    }

    pub fn copied(&self) -> &BTreeSet<String> {
        &self.copied
    }

    /// The kips annotations the user wrote into the template (everything kips did not copy).
    pub fn user_template(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.template
            .iter()
            .filter(|(k, _)| !is_bookkeeping(k) && !self.copied.contains(**k))
            .map(|(k, v)| (*k, *v))
    }

    /// The user keys written into the template directly (kips never removes them).
    pub fn user_template_keys(&self) -> Vec<&'a str> {
        self.user_template()
            .map(|(k, _)| k)
            .filter(|k| USER_KEYS.contains(k))
            .collect()
    }

    /// What the webhook copies into the template. Fails only when a metadata value is invalid.
    pub fn copies(&self) -> Result<Copies, AnnotationError> {
        let mut copies = Copies::default();
        for key in USER_KEYS {
            let Some((_, value)) = self.metadata.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            let value = normalise(key, value)?;
            match self.user_template().find(|(k, _)| *k == key) {
                Some((_, theirs)) if theirs != value => copies.conflicts.push(format!(
                    "kips: {key} is set both on the workload (\"{value}\") and in its pod template (\"{theirs}\"); the template's value is used"
                )),
                Some(_) => {}
                None => {
                    copies.values.insert(key, value);
                }
            }
        }
        Ok(copies)
    }

    /// The annotations the workload's pods get: the user's template annotations, then the
    /// metadata's for keys the template does not set.
    pub fn effective(&self) -> Result<KipsAnnotations, InvalidAnnotations> {
        let copies = self.copies().map_err(|e| self.invalid(vec![e]))?;
        self.effective_with(&copies)
    }

    /// [`effective`](Self::effective), given the [`copies`](Self::copies) already made.
    pub fn effective_with(&self, copies: &Copies) -> Result<KipsAnnotations, InvalidAnnotations> {
        let pairs = self
            .user_template()
            .chain(copies.values.iter().map(|(k, v)| (*k, v.as_str())));
        KipsAnnotations::parse(pairs).map_err(|errors| self.invalid(errors))
    }

    fn invalid(&self, errors: Vec<AnnotationError>) -> InvalidAnnotations {
        InvalidAnnotations {
            from_template: self.user_template().next().is_some(),
            errors,
        }
    }

    /// Whether the template, as it is now (copies included), asks for injection: what the pods
    /// of the current revision were made from.
    pub fn template_wants_injection(&self) -> bool {
        let pairs = self
            .template
            .iter()
            .filter(|(k, _)| !is_bookkeeping(k))
            .map(|(k, v)| (*k, *v));
        KipsAnnotations::parse(pairs).is_ok_and(|a| a.wants_injection())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{REDIRECT, REVERSE};

    fn effective(
        metadata: &[(&str, &str)],
        template: &[(&str, &str)],
    ) -> Result<KipsAnnotations, InvalidAnnotations> {
        WorkloadAnnotations::new(metadata.iter().copied(), template.iter().copied()).effective()
    }

    #[test]
    fn metadata_annotations_count_and_copies_are_not_read_twice() {
        let kips = effective(
            &[(REDIRECT, "api:8080"), ("team", "a")],
            &[(REDIRECT, "api:8080"), (COPIED, "redirect")],
        )
        .unwrap();
        assert_eq!(kips.redirects.len(), 1);
    }

    #[test]
    fn stale_copies_are_ignored_and_user_template_keys_win() {
        // The user removed the annotation; the template still holds the webhook's copy.
        let kips = effective(&[], &[(REDIRECT, "api:8080"), (COPIED, "redirect")]).unwrap();
        assert!(!kips.wants_injection());
        // GitOps: the template's own annotation is what the pods get.
        let kips = effective(
            &[(REDIRECT, "api:9090")],
            &[(REDIRECT, "api:8080"), (REVERSE, "db=pg:5432")],
        )
        .unwrap();
        assert_eq!(kips.redirects[0].to_string(), "api:8080");
        assert_eq!(kips.reverses.len(), 1);
        let template = [
            (REDIRECT, "api:8080"),
            (REVERSE, "db=pg:5432"),
            (COPIED, "redirect"),
        ];
        assert_eq!(
            WorkloadAnnotations::new([], template).user_template_keys(),
            [REVERSE]
        );
    }

    #[test]
    fn conflicting_values_are_reported_and_the_template_wins() {
        let annotations =
            WorkloadAnnotations::new([(REDIRECT, "api:8080")], [(REDIRECT, "api:http")]);
        let copies = annotations.copies().unwrap();
        assert!(copies.values.is_empty());
        assert!(copies.conflicts[0].contains("the template's value is used"));
    }

    #[test]
    fn invalid_annotations_are_reported_with_their_place() {
        let err = effective(&[(REDIRECT, "api:80x0")], &[]).unwrap_err();
        assert!(err.to_string().contains("port \"80x0\""), "{err}");
        assert!(
            err.to_string()
                .starts_with("the workload's kips annotations are invalid")
        );
        let err = effective(&[], &[(REDIRECT, "api:80x0")]).unwrap_err();
        assert!(err.to_string().contains("(metadata and pod template)"));
    }
}
