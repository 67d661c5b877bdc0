//! The `--target` URL: which backend the fleet talks to, and where.

use std::fmt;

use thiserror::Error;

/// A backend to put load on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// twin-server's gRPC API (`grpc://host:port`): one DeviceSync stream per device.
    Grpc {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// An MQTT broker (`mqtt://host:port`, default port 1883): one connection per device.
    Mqtt {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A NATS server (`nats://host:port`, default port 4222): JetStream or core publish.
    Nats {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A `--target` that cannot be used.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    /// No `scheme://`.
    #[error("--target `{0}`: not a URL (expected grpc://host:port, mqtt://host:port or nats://host:port)")]
    NotUrl(String),
    /// A scheme device-sim does not speak.
    #[error("--target `{url}`: unknown scheme `{scheme}` (expected grpc, mqtt or nats)")]
    UnknownScheme {
        /// The whole URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// Host or port missing or malformed, or a path, user or query that means nothing here.
    #[error("--target `{url}`: {reason}")]
    Malformed {
        /// The whole URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

impl Target {
    /// Parses `scheme://host:port` (the port is optional for mqtt and nats).
    ///
    /// # Errors
    /// A missing or unknown scheme, an empty host, a bad port, or anything after the port.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(TargetError::NotUrl(url.to_owned()));
        };
        let default_port = match scheme {
            "grpc" => None,
            "mqtt" => Some(1883),
            "nats" => Some(4222),
            other => {
                return Err(TargetError::UnknownScheme {
                    url: url.to_owned(),
                    scheme: other.to_owned(),
                });
            }
        };
        let malformed = |reason: &str| TargetError::Malformed {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(malformed(
                "only scheme://host:port is accepted (no path, query or user)",
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| malformed(&format!("port `{port}` is not a number from 1 to 65535")))?;
                if port == 0 {
                    return Err(malformed("port 0 is not a port to connect to"));
                }
                (host, port)
            }
            _ => match default_port {
                Some(port) => (authority, port),
                None => return Err(malformed("needs a port (grpc://host:port)")),
            },
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(malformed("needs a host"));
        }
        let host = host.to_owned();
        Ok(match scheme {
            "grpc" => Self::Grpc { host, port },
            "mqtt" => Self::Mqtt { host, port },
            _ => Self::Nats { host, port },
        })
    }

    /// The scheme's name.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Grpc { .. } => "grpc",
            Self::Mqtt { .. } => "mqtt",
            Self::Nats { .. } => "nats",
        }
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        let (Self::Grpc { host, port } | Self::Mqtt { host, port } | Self::Nats { host, port }) = self;
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    /// Host name or address.
    pub fn host(&self) -> &str {
        let (Self::Grpc { host, .. } | Self::Mqtt { host, .. } | Self::Nats { host, .. }) = self;
        host
    }

    /// Port.
    pub fn port(&self) -> u16 {
        let (Self::Grpc { port, .. } | Self::Mqtt { port, .. } | Self::Nats { port, .. }) = self;
        *port
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_schemes_and_defaults() {
        assert_eq!(
            Target::parse("grpc://127.0.0.1:7878"),
            Ok(Target::Grpc {
                host: "127.0.0.1".into(),
                port: 7878
            })
        );
        assert_eq!(
            Target::parse("mqtt://localhost"),
            Ok(Target::Mqtt {
                host: "localhost".into(),
                port: 1883
            })
        );
        assert_eq!(
            Target::parse("nats://[::1]:4222").map(|t| t.authority()),
            Ok("[::1]:4222".into())
        );
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert!(matches!(Target::parse("127.0.0.1:1883"), Err(TargetError::NotUrl(_))));
        assert!(matches!(
            Target::parse("amqp://127.0.0.1"),
            Err(TargetError::UnknownScheme { .. })
        ));
        assert!(matches!(
            Target::parse("grpc://127.0.0.1"),
            Err(TargetError::Malformed { .. })
        ));
        assert!(matches!(
            Target::parse("mqtt://:1883"),
            Err(TargetError::Malformed { .. })
        ));
        assert!(matches!(
            Target::parse("mqtt://h:99999"),
            Err(TargetError::Malformed { .. })
        ));
        assert!(matches!(
            Target::parse("mqtt://h:1883/x"),
            Err(TargetError::Malformed { .. })
        ));
    }
}
