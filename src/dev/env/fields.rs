//! The downward API and resource fields of a pod, and Kubernetes quantities, as the kubelet
//! renders them into environment variables.

use super::*;

/// The downward-API fields an environment variable may name.
pub fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    if let Some(key) = subscript("metadata.labels") {
        return Some(
            meta.labels
                .as_ref()
                .and_then(|l| l.get(&key))
                .cloned()
                .unwrap_or_default(),
        );
    }
    if let Some(key) = subscript("metadata.annotations") {
        return Some(
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(&key))
                .cloned()
                .unwrap_or_default(),
        );
    }
    let text = |v: Option<&String>| v.cloned().unwrap_or_default();
    Some(match path {
        "metadata.name" => text(meta.name.as_ref()),
        "metadata.namespace" => text(meta.namespace.as_ref()),
        "metadata.uid" => text(meta.uid.as_ref()),
        "spec.nodeName" => text(spec.and_then(|s| s.node_name.as_ref())),
        "spec.serviceAccountName" => text(spec.and_then(|s| s.service_account_name.as_ref())),
        "status.hostIP" => text(status.and_then(|s| s.host_ip.as_ref())),
        "status.podIP" => text(status.and_then(|s| s.pod_ip.as_ref())),
        "status.hostIPs" => status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        _ => return None,
    })
}

/// A `resourceFieldRef`'s value: the container's request or limit divided by `divisor`
/// (default 1), rounded up, as the kubelet computes it (CPU in millicores first). An unset
/// limit is the node's allocatable amount.
pub(super) fn resource_value(
    var: &str,
    container: &Container,
    resource: &str,
    divisor: Option<&Quantity>,
    allocatable: Option<&BTreeMap<String, Quantity>>,
) -> Result<String, EnvError> {
    let unsupported = || EnvError::UnsupportedResource {
        var: var.to_owned(),
        resource: resource.to_owned(),
    };
    let (kind, name) = resource.split_once('.').ok_or_else(unsupported)?;
    let known =
        matches!(name, "cpu" | "memory" | "ephemeral-storage") || name.starts_with("hugepages-");
    if !known || !matches!(kind, "limits" | "requests") {
        return Err(unsupported());
    }
    let resources = container.resources.as_ref();
    let set = if kind == "limits" {
        resources.and_then(|r| r.limits.as_ref())
    } else {
        resources.and_then(|r| r.requests.as_ref())
    }
    .and_then(|m| m.get(name));
    let quantity_error = |what: &'static str, text: &str| {
        let text = text.to_owned();
        move |error| EnvError::Quantity {
            var: var.to_owned(),
            what,
            text,
            error,
        }
    };
    let amount = match set {
        Some(q) => Some(q.0.clone()),
        // An unset limit of cpu, memory or ephemeral storage is the node's allocatable.
        None if kind == "limits" && !name.starts_with("hugepages-") => Some(
            allocatable
                .and_then(|a| a.get(name))
                .map(|q| q.0.clone())
                .ok_or_else(|| EnvError::NoNodeAllocatable {
                    var: var.to_owned(),
                    resource: resource.to_owned(),
                    container: container.name.clone(),
                })?,
        ),
        None => None,
    };
    let amount = amount.unwrap_or_else(|| "0".to_owned());
    let divisor = divisor.map_or("1", |d| d.0.as_str());
    let value = parse_quantity(&amount).map_err(quantity_error("the amount", &amount))?;
    let by = parse_quantity(divisor).map_err(quantity_error("the divisor", divisor))?;
    let scale = if name == "cpu" { 1000 } else { 1 };
    let (value, by) = (
        value
            .ceil_scaled(scale)
            .map_err(quantity_error("the amount", &amount))?,
        by.ceil_scaled(scale)
            .map_err(quantity_error("the divisor", divisor))?,
    );
    if by == 0 {
        return Err(EnvError::Quantity {
            var: var.to_owned(),
            what: "the divisor",
            text: divisor.to_owned(),
            error: QuantityError::Zero,
        });
    }
    Ok(value.div_ceil(by).to_string())
}

/// A Kubernetes quantity that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, e3, ...)")]
    Form,
    #[error("it is negative")]
    Negative,
    #[error("it is too large")]
    TooLarge,
    #[error("it is zero")]
    Zero,
}

/// A quantity as an exact number: `digits × 10^exp10 × 2^exp2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedQuantity {
    digits: u128,
    exp10: i32,
    exp2: u32,
}

impl ParsedQuantity {
    /// `⌈self × scale⌉`.
    pub fn ceil_scaled(self, scale: u128) -> Result<u128, QuantityError> {
        let mut numerator = self
            .digits
            .checked_mul(scale)
            .and_then(|n| n.checked_mul(1u128.checked_shl(self.exp2)?))
            .ok_or(QuantityError::TooLarge)?;
        let mut denominator: u128 = 1;
        if self.exp10 >= 0 {
            let factor = 10u128
                .checked_pow(self.exp10 as u32)
                .ok_or(QuantityError::TooLarge)?;
            numerator = numerator
                .checked_mul(factor)
                .ok_or(QuantityError::TooLarge)?;
        } else {
            denominator = 10u128
                .checked_pow(self.exp10.unsigned_abs())
                .ok_or(QuantityError::TooLarge)?;
        }
        Ok(numerator.div_ceil(denominator))
    }
}

/// Parses a Kubernetes quantity (`500m`, `1.5`, `128Mi`, `2G`, `1e3`).
pub fn parse_quantity(text: &str) -> Result<ParsedQuantity, QuantityError> {
    let text = text.trim();
    let text = match text.strip_prefix('+') {
        Some(rest) => rest,
        None if text.starts_with('-') => return Err(QuantityError::Negative),
        None => text,
    };
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(QuantityError::Form);
    }
    let digits_text = format!("{whole}{fraction}");
    let digits: u128 = digits_text.parse().map_err(|_| QuantityError::TooLarge)?;
    let mut exp10 = -(fraction.len() as i32);
    let mut exp2 = 0;
    match suffix {
        "" => {}
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        other => {
            let exponent = other.strip_prefix(['e', 'E']).ok_or(QuantityError::Form)?;
            let exponent: i32 = exponent.parse().map_err(|_| QuantityError::Form)?;
            if exponent.abs() > 40 {
                return Err(QuantityError::TooLarge);
            }
            exp10 += exponent;
        }
    }
    Ok(ParsedQuantity {
        digits,
        exp10,
        exp2,
    })
}
