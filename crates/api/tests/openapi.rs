//! The OpenAPI document and the server agree: every route is documented and every
//! documented operation is a route.

use std::collections::BTreeSet;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn documented() -> (serde_yaml::Value, BTreeSet<(String, String)>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/api/openapi.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    let paths = doc["paths"].as_mapping().expect("a paths object");
    let mut ops = BTreeSet::new();
    for (p, item) in paths {
        let p = p.as_str().expect("path keys are strings");
        for (m, _) in item.as_mapping().expect("a path item object") {
            let m = m.as_str().unwrap();
            if METHODS.contains(&m) {
                ops.insert((m.to_uppercase(), p.to_owned()));
            }
        }
    }
    (doc, ops)
}

#[test]
fn every_route_is_documented_and_the_reverse() {
    let (doc, documented) = documented();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let served: BTreeSet<(String, String)> = forkvm_api::server::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
}

#[test]
fn every_reference_resolves() {
    let (doc, _) = documented();
    fn walk(v: &serde_yaml::Value, doc: &serde_yaml::Value) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, val) in m {
                    if k.as_str() == Some("$ref") {
                        let r = val.as_str().unwrap();
                        let mut at = doc;
                        for part in r.strip_prefix("#/").expect("local refs").split('/') {
                            at = &at[part];
                        }
                        assert!(!at.is_null(), "dangling $ref {r}");
                    }
                    walk(val, doc);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|x| walk(x, doc)),
            _ => {}
        }
    }
    walk(&doc, &doc);
}
