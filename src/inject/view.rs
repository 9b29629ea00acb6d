//! Borrowed, partial views of the objects kips reads during admission.
//!
//! Admission must be fast: instead of deserialising whole k8s-openapi objects, kips reads only
//! the fields it decides on, borrowing strings from the request body where JSON allows it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::annotations::{Protocol, is_kips_container};
use crate::bridge::routes::DeclaredPort;

/// A string borrowed from the request body when it has no escapes, owned otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

pub type StringMap<'a> = BTreeMap<Text<'a>, Text<'a>>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView<'a> {
    #[serde(borrow, default)]
    pub name: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub generate_name: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub namespace: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub annotations: Option<StringMap<'a>>,
    #[serde(borrow, default)]
    pub labels: Option<StringMap<'a>>,
    #[serde(borrow, default)]
    pub owner_references: Option<Vec<OwnerRefView<'a>>>,
}

impl<'a> MetaView<'a> {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .as_ref()?
            .iter()
            .find(|(k, _)| &***k == key)
            .map(|(_, v)| &**v)
    }

    pub fn annotation_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.annotations.iter().flatten().map(|(k, v)| (&**k, &**v))
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .as_ref()?
            .iter()
            .find(|(k, _)| &***k == key)
            .map(|(_, v)| &**v)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRefView<'a> {
    #[serde(borrow)]
    pub kind: Text<'a>,
    #[serde(borrow)]
    pub name: Text<'a>,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView<'a> {
    #[serde(borrow, default)]
    pub metadata: MetaView<'a>,
    #[serde(borrow, default)]
    pub spec: PodSpecView<'a>,
}

impl<'a> PodView<'a> {
    /// A view borrowing from an in-memory JSON value. The value is a pod kips has just
    /// stripped, so it deserialises whenever the request did.
    pub fn deserialize_from(value: &'a serde_json::Value) -> Self {
        PodView::deserialize(value).unwrap_or_default()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView<'a> {
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(borrow, default)]
    pub containers: Vec<ContainerView<'a>>,
    #[serde(borrow, default)]
    pub init_containers: Option<Vec<ContainerView<'a>>>,
}

impl<'a> PodSpecView<'a> {
    pub fn init_containers(&self) -> &[ContainerView<'a>] {
        self.init_containers.as_deref().unwrap_or_default()
    }

    /// Every container of the pod, app containers first.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerView<'a>> {
        self.containers.iter().chain(self.init_containers())
    }

    /// The ports of the app containers (kips' own excepted), for resolving redirects.
    pub fn declared_ports(&self) -> Vec<DeclaredPort<'_>> {
        self.containers
            .iter()
            .enumerate()
            .filter(|(_, c)| !is_kips_container(&c.name))
            .flat_map(|(container, c)| {
                c.ports()
                    .iter()
                    .enumerate()
                    .map(move |(index, p)| DeclaredPort {
                        container,
                        container_name: &c.name,
                        index,
                        name: p.name.as_deref(),
                        number: p.container_port,
                        protocol: p.protocol(),
                    })
            })
            .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView<'a> {
    #[serde(borrow, default)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub ports: Option<Vec<ContainerPortView<'a>>>,
    #[serde(borrow, default)]
    pub liveness_probe: Option<HandlerView<'a>>,
    #[serde(borrow, default)]
    pub readiness_probe: Option<HandlerView<'a>>,
    #[serde(borrow, default)]
    pub startup_probe: Option<HandlerView<'a>>,
    #[serde(borrow, default)]
    pub lifecycle: Option<LifecycleView<'a>>,
}

impl<'a> ContainerView<'a> {
    pub fn ports(&self) -> &[ContainerPortView<'a>] {
        self.ports.as_deref().unwrap_or_default()
    }

    /// The container's port-bearing handlers with their JSON paths below the container.
    pub fn handlers(&self) -> impl Iterator<Item = (&'static str, &HandlerView<'a>)> {
        let lifecycle = self.lifecycle.as_ref();
        [
            ("livenessProbe", self.liveness_probe.as_ref()),
            ("readinessProbe", self.readiness_probe.as_ref()),
            ("startupProbe", self.startup_probe.as_ref()),
            (
                "lifecycle/postStart",
                lifecycle.and_then(|l| l.post_start.as_ref()),
            ),
            (
                "lifecycle/preStop",
                lifecycle.and_then(|l| l.pre_stop.as_ref()),
            ),
        ]
        .into_iter()
        .filter_map(|(path, handler)| handler.map(|h| (path, h)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPortView<'a> {
    #[serde(borrow, default)]
    pub name: Option<Text<'a>>,
    #[serde(default)]
    pub container_port: i32,
    #[serde(borrow, default)]
    pub protocol: Option<Text<'a>>,
}

impl ContainerPortView<'_> {
    pub fn protocol(&self) -> Option<Protocol> {
        Protocol::from_kubernetes(self.protocol.as_deref())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleView<'a> {
    #[serde(borrow, default)]
    pub post_start: Option<HandlerView<'a>>,
    #[serde(borrow, default)]
    pub pre_stop: Option<HandlerView<'a>>,
}

/// A probe or lifecycle handler: only the parts that can name a port.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandlerView<'a> {
    #[serde(borrow, default)]
    pub http_get: Option<PortHolder<'a>>,
    #[serde(borrow, default)]
    pub tcp_socket: Option<PortHolder<'a>>,
}

impl<'a> HandlerView<'a> {
    /// `(json path below the handler, port)` of each action.
    pub fn ports(&self) -> impl Iterator<Item = (&'static str, &PortValue<'a>)> {
        [
            ("httpGet/port", self.http_get.as_ref()),
            ("tcpSocket/port", self.tcp_socket.as_ref()),
        ]
        .into_iter()
        .filter_map(|(path, holder)| holder.map(|h| (path, &h.port)))
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PortHolder<'a> {
    #[serde(borrow, default)]
    pub port: PortValue<'a>,
}

/// Kubernetes' IntOrString as used by probe ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortValue<'a> {
    #[default]
    Absent,
    Number(i64),
    Name(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for PortValue<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl<'de> Visitor<'de> for PortVisitor {
            type Value = PortValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number or name")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(PortValue::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(PortValue::Number(v.try_into().unwrap_or(i64::MAX)))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(PortValue::Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PortValue::Name(Cow::Owned(v.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(PortValue::Absent)
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

/// An apps/v1 Deployment, StatefulSet or DaemonSet.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView<'a> {
    #[serde(borrow, default)]
    pub metadata: MetaView<'a>,
    #[serde(borrow, default)]
    pub spec: WorkloadSpecView<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpecView<'a> {
    /// `None` when absent: an invalid workload, which kips must not patch as if it had one.
    #[serde(borrow, default)]
    pub template: Option<TemplateView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateView<'a> {
    #[serde(borrow, default)]
    pub metadata: Option<MetaView<'a>>,
    #[serde(borrow, default)]
    pub spec: PodSpecView<'a>,
}

/// Any object kips admits, read in a single pass over the request: the fields of a pod and
/// those of a workload's pod template side by side (an object has one or the other), so the
/// body need not be skimmed once to find the object and again to read it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectView<'a> {
    #[serde(borrow, default)]
    pub metadata: MetaView<'a>,
    #[serde(borrow, default)]
    pub spec: ObjectSpecView<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectSpecView<'a> {
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(borrow, default)]
    pub containers: Vec<ContainerView<'a>>,
    #[serde(borrow, default)]
    pub init_containers: Option<Vec<ContainerView<'a>>>,
    #[serde(borrow, default)]
    pub template: Option<TemplateView<'a>>,
}

impl<'a> ObjectView<'a> {
    pub fn into_pod(self) -> PodView<'a> {
        let ObjectSpecView {
            host_network,
            containers,
            init_containers,
            ..
        } = self.spec;
        PodView {
            metadata: self.metadata,
            spec: PodSpecView {
                host_network,
                containers,
                init_containers,
            },
        }
    }

    pub fn into_workload(self) -> WorkloadView<'a> {
        WorkloadView {
            metadata: self.metadata,
            spec: WorkloadSpecView {
                template: self.spec.template,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_plain_strings_and_reads_int_or_string_ports() {
        let json = r#"{"metadata":{"name":"p","annotations":{"kips.io/redirect":"api:8080","x":"a\"b"}},
            "spec":{"containers":[{"name":"app","ports":[{"name":"http","containerPort":8080}],
            "readinessProbe":{"httpGet":{"port":"http","path":"/"}},"livenessProbe":{"tcpSocket":{"port":8080}}}]}}"#;
        let pod: PodView = serde_json::from_str(json).unwrap();
        assert!(matches!(
            pod.metadata.name.as_ref().unwrap().0,
            Cow::Borrowed("p")
        ));
        assert!(matches!(
            pod.metadata
                .annotations
                .as_ref()
                .unwrap()
                .values()
                .last()
                .unwrap()
                .0,
            Cow::Owned(_)
        ));
        assert_eq!(
            pod.metadata.annotation("kips.io/redirect"),
            Some("api:8080")
        );
        let app = &pod.spec.containers[0];
        let ports: Vec<_> = app
            .handlers()
            .flat_map(|(path, h)| h.ports().map(move |(p, v)| (path, p, v.clone())))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("livenessProbe", "tcpSocket/port", PortValue::Number(8080)),
                (
                    "readinessProbe",
                    "httpGet/port",
                    PortValue::Name("http".into())
                ),
            ]
        );
    }
}
