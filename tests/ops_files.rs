//! The operations files stay true to the service: the compose file's
//! configuration parses with the real config parser and wires the services
//! it names, and every metric the dashboard and alert rules use is exported.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;
use moonx_ws::config::Config;

fn root(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn compose_file_configures_a_working_service() {
    let doc: serde_yaml::Value = serde_yaml::from_str(&root("docker-compose.yml")).expect("valid YAML");
    let services = doc["services"].as_mapping().expect("services");
    for name in ["moonx-ws", "redis", "kafka", "demo-producer"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let ws = &doc["services"]["moonx-ws"];
    let env: HashMap<String, String> = ws["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.as_str().expect("quoted values").to_owned()))
        .collect();
    let cfg = Config::from_sources(["moonx-ws"], |k| env.get(k).cloned()).expect("the compose environment parses");
    assert_eq!(cfg.websocket_service_port, 3008);
    let redis_host =
        cfg.redis_url.as_deref().unwrap().trim_start_matches("redis://").split(':').next().unwrap().to_owned();
    assert!(services.contains_key(redis_host.as_str()), "REDIS_URL names the redis service");
    let kafka_host = cfg.kafka_brokers.as_deref().unwrap().split(':').next().unwrap().to_owned();
    assert!(services.contains_key(kafka_host.as_str()), "KAFKA_BROKERS names the kafka service");
    let kafka_env = &doc["services"]["kafka"]["environment"];
    assert_eq!(kafka_env["KAFKA_PROCESS_ROLES"].as_str(), Some("broker,controller"), "KRaft mode");
    assert!(kafka_env["KAFKA_ADVERTISED_LISTENERS"].as_str().unwrap().contains(&format!("{kafka_host}:9092")));
    let ports: Vec<&str> = ws["ports"].as_sequence().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(ports.contains(&"3008:3008"));
    let producer = serde_yaml::to_string(&doc["services"]["demo-producer"]).unwrap();
    assert!(producer.contains(&cfg.kafka_topic_prices), "the demo producer feeds the prices topic");
}

#[test]
fn dashboard_and_alerts_use_exported_metrics() {
    // An unreachable Redis makes the Redis metrics appear too.
    let srv = TestServer::start(&[("REDIS_URL", "redis://127.0.0.1:1/"), ("REDIS_TIMEOUT_MS", "50")]);
    srv.wait_ready();
    let (_, exposition) = get(srv.addr, "/metrics");
    // Metric families as declared (a gauge may have no sample yet, e.g. lag
    // before librdkafka's first statistics).
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    for file in ["ops/grafana-dashboard.json", "ops/alerts.yml"] {
        let text = root(file);
        let mut used = BTreeSet::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("moonx_ws_") {
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            used.insert(name.trim_end_matches("_bucket").to_owned());
            rest = &rest[i + 9..];
        }
        assert!(!used.is_empty());
        for name in &used {
            assert!(exported.contains(name), "{file} uses {name}, which /metrics does not export");
        }
    }
    // Conventions: counters end in _total, durations are in seconds.
    for line in exposition.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        if kind == "histogram" {
            assert!(name.ends_with("_seconds"), "{name}");
        }
    }
}
