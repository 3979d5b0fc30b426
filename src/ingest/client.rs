//! The librdkafka properties every Kafka client of the service shares.
//!
//! Owns: turning the configuration's Kafka security settings (TLS, SASL,
//! mutual TLS) and its `KAFKA_CONFIG_*` passthrough into librdkafka
//! properties, once, for any client the service creates: the ingest
//! consumer, the embedded broker's demo-feed producer, and any producer
//! added later. Each client adds only what is its own (the consumer's
//! group, offsets, fetch sizes). Also owns keeping secrets out of text:
//! [`ClientSettings`] never shows a password, and [`ClientSettings::redact`]
//! scrubs them from anything librdkafka says before it is logged or shown.
//!
//! Must not: create clients or log property values (passthrough values may
//! be secrets too).

use rdkafka::ClientConfig;

use crate::config::{Config, KAFKA_CONFIG_PREFIX};

/// Properties the service sets itself (a client that differs breaks
/// ingest), or that have their own variable: not accepted through
/// `KAFKA_CONFIG_*`, with the variable to use instead.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "KAFKA_BROKERS"),
    ("metadata.broker.list", "KAFKA_BROKERS"),
    ("group.id", "KAFKA_CONSUMER_GROUP_ID"),
    ("enable.auto.commit", "nothing: ingest commits no offsets"),
    ("auto.offset.reset", "nothing: ingest decides per topic where to resume"),
    ("enable.partition.eof", "nothing: ingest needs it off"),
    ("statistics.interval.ms", "nothing: /health and /metrics read the statistics every second"),
    ("fetch.max.bytes", "KAFKA_CONSUMER_FETCH_MAX_BYTES"),
    ("max.partition.fetch.bytes", "KAFKA_CONSUMER_MAX_PARTITION_FETCH_BYTES"),
    ("fetch.wait.max.ms", "KAFKA_FETCH_WAIT_MAX_MS"),
    ("security.protocol", "KAFKA_SECURITY_PROTOCOL"),
    ("sasl.mechanism", "KAFKA_SASL_MECHANISM"),
    ("sasl.mechanisms", "KAFKA_SASL_MECHANISM"),
    ("sasl.username", "KAFKA_SASL_USERNAME"),
    ("sasl.password", "KAFKA_SASL_PASSWORD"),
    ("ssl.ca.location", "KAFKA_SSL_CA_LOCATION"),
    ("ssl.certificate.location", "KAFKA_SSL_CERTIFICATE_LOCATION"),
    ("ssl.key.location", "KAFKA_SSL_KEY_LOCATION"),
    ("ssl.key.password", "KAFKA_SSL_KEY_PASSWORD"),
];

/// Passthrough properties whose values count as secrets (scrubbed from
/// errors; no value is ever logged anyway).
fn is_secret_property(name: &str) -> bool {
    ["password", "secret", ".pem", "jaas", "oauthbearer.config", "keytab"].iter().any(|s| name.contains(s))
}

/// A Kafka setting that cannot work as given (a start-up error naming
/// the variables; never a secret's value).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

/// The properties shared by every Kafka client, checked.
#[derive(Clone)]
pub struct ClientSettings {
    props: Vec<(String, String)>,
    /// Values to scrub from any text shown (passwords, secret passthrough values).
    secrets: Vec<String>,
    /// `PLAINTEXT`, `SSL`, `SASL_SSL/SCRAM-SHA-512`, ...: for logs and `/health`.
    security: String,
}

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.props.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ClientSettings").field("security", &self.security).field("properties", &names).finish()
    }
}

impl ClientSettings {
    /// Checks the configuration's Kafka security settings and passthrough
    /// properties, and turns them into librdkafka properties.
    pub fn from_config(cfg: &Config) -> Result<Self, ClientError> {
        let protocol = cfg.kafka_security_protocol.to_ascii_uppercase();
        let sasl = protocol.starts_with("SASL_");
        let tls = protocol.ends_with("SSL");
        let mut props: Vec<(String, String)> = vec![("security.protocol".into(), protocol.to_ascii_lowercase())];
        let mut secrets = Vec::new();
        let mechanism = cfg.kafka_sasl_mechanism.to_ascii_uppercase();
        match (sasl, &cfg.kafka_sasl_username, &cfg.kafka_sasl_password) {
            (true, Some(user), Some(password)) if !user.is_empty() && !password.expose().is_empty() => {
                props.push(("sasl.mechanism".into(), mechanism.clone()));
                props.push(("sasl.username".into(), user.clone()));
                props.push(("sasl.password".into(), password.expose().to_owned()));
                secrets.push(password.expose().to_owned());
            }
            (true, _, _) => {
                return Err(ClientError(format!(
                    "KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (mechanism {mechanism})"
                )))
            }
            (false, None, None) => {}
            (false, _, _) => {
                return Err(ClientError(format!(
                    "KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD are set but KAFKA_SECURITY_PROTOCOL is {protocol}: set SASL_SSL (or SASL_PLAINTEXT) to log in"
                )))
            }
        }
        let files = [
            ("KAFKA_SSL_CA_LOCATION", "ssl.ca.location", &cfg.kafka_ssl_ca_location),
            ("KAFKA_SSL_CERTIFICATE_LOCATION", "ssl.certificate.location", &cfg.kafka_ssl_certificate_location),
            ("KAFKA_SSL_KEY_LOCATION", "ssl.key.location", &cfg.kafka_ssl_key_location),
        ];
        if tls {
            if cfg.kafka_ssl_certificate_location.is_some() != cfg.kafka_ssl_key_location.is_some() {
                return Err(ClientError(
                    "mutual TLS needs both KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION".into(),
                ));
            }
            for (var, property, value) in files {
                if let Some(path) = value {
                    if std::fs::metadata(path).is_err() {
                        return Err(ClientError(format!("{var}: cannot read {path}")));
                    }
                    props.push((property.into(), path.clone()));
                }
            }
            if cfg.kafka_ssl_ca_location.is_none() {
                // The system's CA certificates: OpenSSL is linked statically,
                // so its compiled-in directory is not this system's; librdkafka
                // finds the distribution's bundle by probing the usual paths.
                props.push(("ssl.ca.location".into(), "probe".into()));
            }
            if let Some(p) = &cfg.kafka_ssl_key_password {
                props.push(("ssl.key.password".into(), p.expose().to_owned()));
                secrets.push(p.expose().to_owned());
            }
        } else if let Some((var, _, _)) = files.iter().find(|(_, _, v)| v.is_some()) {
            return Err(ClientError(format!(
                "{var} is set but KAFKA_SECURITY_PROTOCOL is {protocol}: set SSL or SASL_SSL to use TLS"
            )));
        } else if cfg.kafka_ssl_key_password.is_some() {
            return Err(ClientError(format!(
                "KAFKA_SSL_KEY_PASSWORD is set but KAFKA_SECURITY_PROTOCOL is {protocol}: set SSL or SASL_SSL to use TLS"
            )));
        }
        for (name, value) in &cfg.kafka_config {
            let var = env_var_of(name);
            if let Some((_, instead)) = RESERVED.iter().find(|(p, _)| *p == name) {
                return Err(ClientError(format!("{var} ({name}): not settable this way; use {instead}")));
            }
            if is_secret_property(name) && !value.is_empty() {
                secrets.push(value.clone());
            }
            props.retain(|(k, _)| k != name);
            props.push((name.clone(), value.clone()));
        }
        let security = if sasl { format!("{protocol}/{mechanism}") } else { protocol };
        Ok(Self { props, secrets, security })
    }

    /// A librdkafka configuration with these properties and `bootstrap`;
    /// the caller adds what is its own.
    pub fn client_config(&self, bootstrap: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap);
        for (k, v) in &self.props {
            config.set(k, v);
        }
        config
    }

    /// The property's value as set here (tests; never log it).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.props.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The names of the properties set, without their values (for logs).
    pub fn names(&self) -> Vec<&str> {
        self.props.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// `PLAINTEXT`, `SSL`, `SASL_SSL/SCRAM-SHA-512`, ...
    pub fn security(&self) -> &str {
        &self.security
    }

    /// `text` with every secret value replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if !s.is_empty() && out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// The `KAFKA_CONFIG_*` variable that sets `property` (for messages).
fn env_var_of(property: &str) -> String {
    let upper = property.to_ascii_uppercase().replace('_', "__").replace('.', "_");
    format!("{KAFKA_CONFIG_PREFIX}{upper}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(env: &[(&str, &str)]) -> Result<ClientSettings, String> {
        let map: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cfg = Config::from_sources_with(["moonx-ws"], |k| map.get(k).cloned(), map.keys().cloned())
            .map_err(|e| e.to_string())?;
        ClientSettings::from_config(&cfg).map_err(|e| e.to_string())
    }

    #[test]
    fn plaintext_by_default() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.get("security.protocol"), Some("plaintext"));
        assert_eq!(s.get("sasl.username"), None);
        assert_eq!(s.get("ssl.ca.location"), None);
        assert_eq!(s.security(), "PLAINTEXT");
    }

    #[test]
    fn sasl_ssl_with_scram_as_a_managed_kafka_wants_it() {
        let s = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "svc-moonx"),
            ("KAFKA_SASL_PASSWORD", "s3cr3t-pw"),
        ])
        .unwrap();
        assert_eq!(s.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(s.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(s.get("sasl.username"), Some("svc-moonx"));
        assert_eq!(s.get("sasl.password"), Some("s3cr3t-pw"));
        assert_eq!(s.get("ssl.ca.location"), Some("probe"), "the system's CA store");
        assert_eq!(s.security(), "SASL_SSL/SCRAM-SHA-512");
        assert!(!format!("{s:?}").contains("s3cr3t-pw"), "{s:?}");
        assert_eq!(s.redact("login as svc-moonx with s3cr3t-pw failed"), "login as svc-moonx with *** failed");
        // librdkafka takes every property (SCRAM needs the OpenSSL build).
        let consumer: Result<rdkafka::consumer::BaseConsumer, _> = s.client_config("127.0.0.1:1").create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
    }

    #[test]
    fn sasl_mechanism_defaults_to_plain_and_needs_credentials() {
        let s = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_USERNAME", "KEY"),
            ("KAFKA_SASL_PASSWORD", "SECRET"),
        ])
        .unwrap();
        assert_eq!(s.get("sasl.mechanism"), Some("PLAIN"));
        let err = settings(&[("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"), ("KAFKA_SASL_USERNAME", "KEY")]).unwrap_err();
        assert!(err.contains("KAFKA_SASL_PASSWORD"), "{err}");
        let err = settings(&[("KAFKA_SASL_USERNAME", "KEY"), ("KAFKA_SASL_PASSWORD", "SECRET")]).unwrap_err();
        assert!(err.contains("KAFKA_SECURITY_PROTOCOL is PLAINTEXT") && !err.contains("SECRET"), "{err}");
        let err = settings(&[("KAFKA_SASL_MECHANISM", "GSSAPI")]).unwrap_err();
        assert!(err.contains("KAFKA_SASL_MECHANISM"), "{err}");
    }

    #[test]
    fn tls_files_and_mutual_tls() {
        let dir = std::env::temp_dir();
        let ca = dir.join(format!("moonx-client-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "not checked here").unwrap();
        let ca = ca.to_str().unwrap();
        let s = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SSL"),
            ("KAFKA_SSL_CA_LOCATION", ca),
            ("KAFKA_SSL_CERTIFICATE_LOCATION", ca),
            ("KAFKA_SSL_KEY_LOCATION", ca),
            ("KAFKA_SSL_KEY_PASSWORD", "key-pass-1"),
        ])
        .unwrap();
        assert_eq!(s.get("ssl.ca.location"), Some(ca));
        assert_eq!(s.get("ssl.certificate.location"), Some(ca));
        assert_eq!(s.get("ssl.key.location"), Some(ca));
        assert_eq!(s.redact("bad passphrase key-pass-1"), "bad passphrase ***");
        let err = settings(&[("KAFKA_SECURITY_PROTOCOL", "SSL"), ("KAFKA_SSL_CERTIFICATE_LOCATION", ca)]).unwrap_err();
        assert!(err.contains("KAFKA_SSL_KEY_LOCATION"), "{err}");
        let err = settings(&[("KAFKA_SSL_CA_LOCATION", ca)]).unwrap_err();
        assert!(err.contains("KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"), "{err}");
        let err = settings(&[("KAFKA_SECURITY_PROTOCOL", "SSL"), ("KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem")])
            .unwrap_err();
        assert!(err.contains("KAFKA_SSL_CA_LOCATION: cannot read /nonexistent/ca.pem"), "{err}");
        let _ = std::fs::remove_file(ca);
    }

    #[test]
    fn passthrough_maps_variable_names_to_properties() {
        let s = settings(&[
            ("KAFKA_CONFIG_SOCKET_KEEPALIVE_ENABLE", "true"),
            ("KAFKA_CONFIG_LOG__LEVEL", "6"),
            ("KAFKA_CONFIG_CLIENT_ID", "moonx-edge"),
            ("KAFKA_CONFIG_SSL_KEY_PEM", "-----BEGIN PRIVATE KEY-----abc"),
        ])
        .unwrap();
        assert_eq!(s.get("socket.keepalive.enable"), Some("true"));
        assert_eq!(s.get("log_level"), Some("6"));
        assert_eq!(s.get("client.id"), Some("moonx-edge"));
        assert_eq!(s.redact("x -----BEGIN PRIVATE KEY-----abc y"), "x *** y", "a PEM value is a secret");
        assert!(s.names().contains(&"socket.keepalive.enable"));
        // Flags win over the environment.
        let map: HashMap<String, String> = [("KAFKA_CONFIG_CLIENT_ID".to_string(), "from-env".to_string())].into();
        let cfg = Config::from_sources_with(
            ["moonx-ws", "--kafka-config", "client.id=from-flag"],
            |k| map.get(k).cloned(),
            map.keys().cloned(),
        )
        .unwrap();
        assert_eq!(ClientSettings::from_config(&cfg).unwrap().get("client.id"), Some("from-flag"));
    }

    #[test]
    fn passthrough_refuses_what_the_service_or_a_variable_sets() {
        let err = settings(&[("KAFKA_CONFIG_GROUP_ID", "x")]).unwrap_err();
        assert!(err.contains("KAFKA_CONFIG_GROUP_ID (group.id)") && err.contains("KAFKA_CONSUMER_GROUP_ID"), "{err}");
        let err = settings(&[("KAFKA_CONFIG_SASL_PASSWORD", "pw-in-passthrough")]).unwrap_err();
        assert!(err.contains("KAFKA_SASL_PASSWORD") && !err.contains("pw-in-passthrough"), "{err}");
        let err = settings(&[("KAFKA_CONFIG_ENABLE_AUTO_COMMIT", "true")]).unwrap_err();
        assert!(err.contains("enable.auto.commit"), "{err}");
        let err = settings(&[("KAFKA_CONFIG_", "x")]).unwrap_err();
        assert!(err.contains("not a librdkafka property name"), "{err}");
        let err = settings(&[("KAFKA_CONFIG_SOCKET-KEEPALIVE", "x")]).unwrap_err();
        assert!(err.contains("KAFKA_CONFIG_SOCKET-KEEPALIVE"), "{err}");
    }

    #[test]
    fn the_settings_reach_librdkafka() {
        // A client built from them holds them in its effective configuration.
        let s = settings(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
            ("KAFKA_SASL_USERNAME", "svc-moonx"),
            ("KAFKA_SASL_PASSWORD", "pw-effective"),
            ("KAFKA_CONFIG_SOCKET_KEEPALIVE_ENABLE", "true"),
            ("KAFKA_CONFIG_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM", "none"),
        ])
        .unwrap();
        let consumer: rdkafka::consumer::BaseConsumer = s.client_config("127.0.0.1:1").create().unwrap();
        let effective =
            |name| crate::sys::kafka::effective_property(rdkafka::consumer::Consumer::client(&consumer), name);
        assert_eq!(effective("security.protocol").as_deref(), Some("sasl_ssl"));
        assert_eq!(effective("sasl.mechanisms").as_deref(), Some("SCRAM-SHA-256"));
        assert_eq!(effective("sasl.username").as_deref(), Some("svc-moonx"));
        assert_eq!(effective("sasl.password").as_deref(), Some("pw-effective"));
        assert_eq!(effective("ssl.ca.location").as_deref(), Some("probe"));
        assert_eq!(effective("socket.keepalive.enable").as_deref(), Some("true"));
        assert_eq!(effective("ssl.endpoint.identification.algorithm").as_deref(), Some("none"));
        assert_eq!(effective("bootstrap.servers").as_deref(), Some("127.0.0.1:1"));
    }

    #[test]
    fn an_unknown_property_is_refused_by_librdkafka_without_its_value() {
        let s = settings(&[("KAFKA_CONFIG_NO_SUCH_PROPERTY", "v")]).unwrap();
        let err = s.client_config("127.0.0.1:1").create::<rdkafka::consumer::BaseConsumer>().err().unwrap();
        assert!(err.to_string().contains("no.such.property"), "{err}");
    }
}
