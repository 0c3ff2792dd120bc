//! The Kibana saved objects (deploy/kibana/saved-objects.ndjson) parse, hang together,
//! and use only fields that the index mappings define. (Kibana cannot run here.)

use comm_aggregator::clients::elastic::{communications_mapping, logs_mapping};
use serde_json::Value;
use std::collections::{HashMap, HashSet};

fn fields(mapping: Value) -> HashSet<String> {
    mapping["mappings"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn walk_fields(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "field" {
                    if let Some(f) = x.as_str() {
                        out.push(f.to_string());
                    }
                }
                walk_fields(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk_fields(x, out)),
        _ => {}
    }
}

/// Field names in a KQL query such as `status : failed or service : sms`.
fn kql_fields(q: &str) -> Vec<String> {
    let words: Vec<&str> = q.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[1] == ":")
        .map(|w| w[0].to_string())
        .collect()
}

#[test]
fn saved_objects_parse_and_refer_only_to_mapped_fields() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kibana/saved-objects.ndjson"
    ))
    .unwrap();
    let objects: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("every line is a JSON object"))
        .collect();
    let mut views: HashMap<String, HashSet<String>> = HashMap::new();
    for o in objects.iter().filter(|o| o["type"] == "index-pattern") {
        let title = o["attributes"]["title"].as_str().unwrap();
        let f = match title {
            "communications" => fields(communications_mapping()),
            "communication-logs" => fields(logs_mapping()),
            other => panic!("a data view over an unknown index {other}"),
        };
        let tf = o["attributes"]["timeFieldName"].as_str().unwrap();
        assert!(f.contains(tf), "time field {tf} of {title}");
        views.insert(o["id"].as_str().unwrap().to_string(), f);
    }
    assert_eq!(views.len(), 2, "data views over both indices");
    let ids: HashSet<&str> = objects.iter().map(|o| o["id"].as_str().unwrap()).collect();
    let mut visualizations = 0;
    for o in objects.iter().filter(|o| o["type"] == "visualization") {
        visualizations += 1;
        let title = o["attributes"]["title"].as_str().unwrap();
        let dv = o["references"][0]["id"].as_str().unwrap();
        let known = views
            .get(dv)
            .unwrap_or_else(|| panic!("{title} refers to a missing data view {dv}"));
        let vis: Value =
            serde_json::from_str(o["attributes"]["visState"].as_str().unwrap()).unwrap();
        let search: Value = serde_json::from_str(
            o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let mut used = Vec::new();
        walk_fields(&vis, &mut used);
        used.extend(kql_fields(search["query"]["query"].as_str().unwrap_or("")));
        assert!(!used.is_empty(), "{title} uses no field");
        for f in used {
            assert!(
                known.contains(&f),
                "{title} uses {f}, which the {dv} mapping does not define"
            );
        }
    }
    assert!(visualizations >= 8);
    // A log document leaves out an attempt of 0 (`actors::log_indexer::attempt_left_out`):
    // the attempts histogram counts it in 0, not nowhere.
    let attempts = objects
        .iter()
        .find(|o| o["id"] == "vis-attempts")
        .expect("the attempts histogram");
    let vis: Value =
        serde_json::from_str(attempts["attributes"]["visState"].as_str().unwrap()).unwrap();
    let histogram = vis["aggs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["type"] == "histogram" && a["params"]["field"] == "attempt")
        .expect("a histogram over attempt");
    let input: Value = serde_json::from_str(histogram["params"]["json"].as_str().unwrap()).unwrap();
    assert_eq!(input["missing"], 0, "{histogram}");
    let dashboards: Vec<&str> = objects
        .iter()
        .filter(|o| o["type"] == "dashboard")
        .map(|o| o["attributes"]["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        dashboards,
        [
            "Communication overview",
            "Service health",
            "Operational metrics"
        ]
    );
    for o in objects.iter().filter(|o| o["type"] == "dashboard") {
        let panels: Vec<Value> =
            serde_json::from_str(o["attributes"]["panelsJSON"].as_str().unwrap()).unwrap();
        for p in panels {
            let name = p["panelRefName"].as_str().unwrap();
            let r = o["references"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name)
                .unwrap();
            assert!(
                ids.contains(r["id"].as_str().unwrap()),
                "dashboard panel {name} refers to a missing object"
            );
        }
    }
}
