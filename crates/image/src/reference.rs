//! Image names and references: parsing and normalization.
//!
//! Local names are normalized like podman's: a name without a registry host gets
//! `localhost/` (`busybox` → `localhost/busybox:latest`); a name with a host keeps it
//! (`127.0.0.1:5000/img:tag`); the tag defaults to `latest`. A component is a registry
//! host when it contains `.` or `:`, is `localhost`, or is a bracketed IPv6 address, as
//! in Docker. Docker Hub names get Docker's `library/` for single-component
//! repositories (`docker.io/busybox` → `docker.io/library/busybox:latest`).
//!
//! For pulls, a reference without a host means Docker Hub, like `docker pull`.

use std::net::Ipv4Addr;

use crate::digest::digest_hex;
use crate::error::Error;

/// Where a name without a registry host points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DefaultRegistry {
    /// Local names (`load`, lookups): `localhost/`, like podman.
    Localhost,
    /// Pulls: Docker Hub, like `docker pull`.
    DockerHub,
}

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ImageRef {
    pub(crate) registry: String,
    pub(crate) repository: String,
    pub(crate) tag: Option<String>,
    pub(crate) digest: Option<String>,
}

const DOCKER_HUB: &str = "docker.io";

impl ImageRef {
    /// Parses `reference`; `default` decides where a name without a host points.
    pub(crate) fn parse(reference: &str, default: DefaultRegistry) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidReference {
            reference: reference.to_string(),
            reason,
        };
        if reference.is_empty() {
            return Err(bad("empty name"));
        }
        let (name, digest) = match reference.rsplit_once('@') {
            Some((name, digest)) => {
                digest_hex(digest, reference)
                    .map_err(|_| bad("the digest must be sha256:<64 hex digits>"))?;
                (name, Some(digest.to_string()))
            }
            None => (reference, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(bad(
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (first.to_string(), rest),
            _ => match default {
                DefaultRegistry::Localhost => ("localhost".to_string(), name),
                DefaultRegistry::DockerHub => (DOCKER_HUB.to_string(), name),
            },
        };
        if !valid_host(&registry) {
            return Err(bad("malformed registry host"));
        }
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("repository names must be lowercase"));
        }
        if !path.split('/').all(valid_path_component) {
            return Err(bad(
                "repository path components are [a-z0-9] separated by single ., _, __ or -",
            ));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The name the store records: `registry/repository:tag`, or
    /// `registry/repository@digest` for a reference by digest alone.
    pub(crate) fn name(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => format!("{}/{}:{tag}", self.registry, self.repository),
            (None, Some(digest)) => format!("{}/{}@{digest}", self.registry, self.repository),
            (None, None) => format!("{}/{}", self.registry, self.repository),
        }
    }

    /// Whether the registry is on this machine (`localhost`, 127.0.0.0/8, `[::1]`),
    /// where Docker talks plain HTTP.
    pub(crate) fn is_loopback_registry(&self) -> bool {
        let host = if self.registry.starts_with('[') {
            self.registry.split_inclusive(']').next().unwrap_or("")
        } else {
            self.registry.split(':').next().unwrap_or("")
        };
        host == "localhost"
            || host == "[::1]"
            || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// Normalizes a local image name like podman: `busybox` → `localhost/busybox:latest`,
/// `127.0.0.1:5000/x` → `127.0.0.1:5000/x:latest`, `docker.io/busybox` →
/// `docker.io/library/busybox:latest`.
pub fn normalize_name(name: &str) -> Result<String, Error> {
    ImageRef::parse(name, DefaultRegistry::Localhost).map(|r| r.name())
}

/// The normalized names a lookup of `name` may mean: the local normalization, and for a
/// name without a host also the Docker Hub one (so `busybox` finds a pulled
/// `docker.io/library/busybox:latest`). Empty when `name` does not parse as a name.
pub(crate) fn lookup_candidates(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(local) = ImageRef::parse(name, DefaultRegistry::Localhost) {
        out.push(local.name());
        if let Ok(hub) = ImageRef::parse(name, DefaultRegistry::DockerHub) {
            if hub.name() != out[0] && !has_registry_host(name) {
                out.push(hub.name());
            }
        }
    }
    out
}

fn has_registry_host(name: &str) -> bool {
    name.split_once('/')
        .is_some_and(|(first, _)| is_registry_host(first))
}

fn is_registry_host(component: &str) -> bool {
    component.contains('.')
        || component.contains(':')
        || component == "localhost"
        || component.starts_with('[')
}

fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((addr, port)) => {
                if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                    return false;
                }
                ("ipv6", port.strip_prefix(':'))
            }
            None => return false,
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    name_ok && port_ok
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    !b.is_empty()
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter()
            .all(|&x| alnum(x) || matches!(x, b'.' | b'_' | b'-'))
        && !c.contains("..")
        && !c.contains("___")
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    (1..=128).contains(&b.len())
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(s: &str) -> String {
        normalize_name(s).unwrap()
    }

    #[test]
    fn local_names_normalize_like_podman() {
        assert_eq!(local("busybox"), "localhost/busybox:latest");
        assert_eq!(local("busybox:1.36"), "localhost/busybox:1.36");
        assert_eq!(local("localhost/busybox"), "localhost/busybox:latest");
        assert_eq!(local("team/app:v2"), "localhost/team/app:v2");
        assert_eq!(local("127.0.0.1:5000/img:1"), "127.0.0.1:5000/img:1");
        assert_eq!(
            local("registry.example.com/a/b"),
            "registry.example.com/a/b:latest"
        );
        assert_eq!(
            local("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(local("[::1]:5000/x:y"), "[::1]:5000/x:y");
        let d = crate::digest::sha256_of(b"m");
        assert_eq!(
            local(&format!("localhost:5000/x@{d}")),
            format!("localhost:5000/x@{d}")
        );
        assert_eq!(local(&format!("x:1@{d}")), "localhost/x:1");
    }

    #[test]
    fn pulls_default_to_docker_hub() {
        let r = ImageRef::parse("busybox", DefaultRegistry::DockerHub).unwrap();
        assert_eq!(r.name(), "docker.io/library/busybox:latest");
        assert!(!r.is_loopback_registry());
        for loopback in [
            "localhost/x",
            "localhost:5000/x",
            "127.0.0.1:5000/x",
            "127.1.2.3/x",
            "[::1]:5000/x",
        ] {
            let r = ImageRef::parse(loopback, DefaultRegistry::DockerHub).unwrap();
            assert!(r.is_loopback_registry(), "{loopback}");
        }
        let r = ImageRef::parse("10.0.0.1:5000/x", DefaultRegistry::DockerHub).unwrap();
        assert!(!r.is_loopback_registry());
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "/abs",
            "x@sha256:123",
            "bad host!/x",
            "x/../y",
            "-x",
        ] {
            assert!(
                matches!(normalize_name(bad), Err(Error::InvalidReference { .. })),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn lookups_also_try_docker_hub_for_short_names() {
        assert_eq!(
            lookup_candidates("busybox"),
            [
                "localhost/busybox:latest",
                "docker.io/library/busybox:latest"
            ]
        );
        assert_eq!(
            lookup_candidates("127.0.0.1:5000/x:1"),
            ["127.0.0.1:5000/x:1"]
        );
        assert!(lookup_candidates("NOT A NAME").is_empty());
    }
}
