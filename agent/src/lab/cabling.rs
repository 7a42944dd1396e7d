//! The lab's fabric as `lab status` shows it: who is cabled to whom (each link's two ends,
//! interfaces and addresses), and each router's BGP sessions as its own daemon reports them.

use super::fabric;
use super::net;
use super::router;
use super::state::LabState;
use super::topology::RouterKind;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// One cable: its two ends as (device, interface, IPv4 address).
pub fn links(lab: &LabState) -> Vec<Value> {
    let end = |who: &str, iface: String, addr: String| json!({"name": who, "interface": iface, "address": addr});
    let mut out = Vec::new();
    for (n, node) in lab.nodes.iter().enumerate() {
        for r in lab.topology.routers_of(n) {
            // A switch's port has no address of its own.
            let router_addr = match lab.routers[r].kind {
                RouterKind::Switch => String::new(),
                _ => router::router_addr(r, n),
            };
            out.push(json!({
                "a": end(&node.name, format!("eth{r}"), router::node_addr(r, n)),
                "b": end(&lab.routers[r].name, router::router_if(n), router_addr),
            }));
        }
    }
    for link in fabric::uplinks(&lab.topology) {
        out.push(json!({
            "a": end(&lab.routers[link.tor].name, link.tor_if(), link.tor_addr()),
            "b": end(&lab.routers[link.spine].name, link.spine_if(), link.spine_addr()),
        }));
    }
    out
}

/// What a router's peer address (or, unnumbered, its interface) names: the node or router at
/// the other end of that link.
fn peer_names(lab: &LabState, router: usize) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for link in links(lab) {
        for (me, other) in [(&link["a"], &link["b"]), (&link["b"], &link["a"])] {
            if me["name"] == lab.routers[router].name.as_str() {
                let other_name = other["name"].as_str().unwrap_or_default().to_string();
                for key in [&other["address"], &me["interface"]] {
                    names.insert(
                        key.as_str().unwrap_or_default().to_string(),
                        other_name.clone(),
                    );
                }
            }
        }
    }
    names
}

/// Router `index`'s BGP sessions: peer (name), the address or interface the daemon knows it
/// by, and its state in the daemon's words. Empty for a static router or a daemon that did not
/// answer.
pub fn sessions(lab: &LabState, index: usize) -> Vec<Value> {
    let router = &lab.routers[index];
    let dir = lab.router_dir(&router.name);
    let names = peer_names(lab, index);
    let session = |key: &str, state: &str| {
        json!({"peer": names.get(key).cloned().unwrap_or_else(|| key.to_string()),
               "address": key, "state": state})
    };
    match router.kind {
        RouterKind::Bird => {
            let ctl = dir.join("bird.ctl");
            let cmd = format!("birdc -s {} show protocols all", ctl.display());
            let Ok(text) = net::sh(&router.netns, &cmd) else {
                return Vec::new();
            };
            bird_sessions(&text)
                .into_iter()
                .map(|(addr, state)| session(&addr, &state))
                .collect()
        }
        RouterKind::Frr => {
            let cmd = format!(
                "vtysh --vty_socket {} -d bgpd -c 'show bgp neighbors json'",
                dir.join("frr").display()
            );
            let text = net::sh(&router.netns, &cmd).unwrap_or_default();
            let Ok(Value::Object(peers)) = serde_json::from_str::<Value>(&text) else {
                return Vec::new();
            };
            peers
                .iter()
                .map(|(key, p)| session(key, p["bgpState"].as_str().unwrap_or("")))
                .collect()
        }
        RouterKind::Gobgp => {
            let text = net::sh(&router.netns, "gobgp -j neighbor").unwrap_or_default();
            let Ok(Value::Array(peers)) = serde_json::from_str::<Value>(&text) else {
                return Vec::new();
            };
            peers
                .iter()
                .map(|p| {
                    let state = match &p["state"]["session_state"] {
                        Value::Number(n) if n.as_u64() == Some(6) => "Established".to_string(),
                        Value::Number(n) => format!("state {n}"),
                        other => other.as_str().unwrap_or("").to_string(),
                    };
                    session(p["conf"]["neighbor_address"].as_str().unwrap_or(""), &state)
                })
                .collect()
        }
        RouterKind::None | RouterKind::Switch => Vec::new(),
    }
}

/// (neighbor address, state) of each BGP protocol in `birdc show protocols all`: the state is
/// the protocol line's last column (Established, Active, …), the address its "Neighbor address".
fn bird_sessions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut state: Option<String> = None;
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if !line.starts_with(' ') && cols.get(1) == Some(&"BGP") {
            state = Some(cols.get(5).copied().unwrap_or(cols[3]).to_string());
        } else if let (Some(s), Some(addr)) = (
            state.as_ref(),
            line.trim().strip_prefix("Neighbor address:"),
        ) {
            out.push((addr.trim().to_string(), s.clone()));
            state = None;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_protocols_give_address_and_state() {
        let text = "BIRD 2.0.12 ready.\n\
            Name       Proto      Table      State  Since         Info\n\
            device1    Device     ---        up     17:01:02.000  \n\
            n_n1       BGP        ---        up     17:01:03.000  Established   \n\
            \x20 BGP state:          Established\n\
            \x20   Neighbor address: 10.0.1.2\n\
            f_spine1   BGP        ---        start  17:01:03.000  Active        Socket: Connection refused\n\
            \x20 BGP state:          Active\n\
            \x20   Neighbor address: 172.16.0.1\n";
        assert_eq!(
            bird_sessions(text),
            vec![
                ("10.0.1.2".to_string(), "Established".to_string()),
                ("172.16.0.1".to_string(), "Active".to_string())
            ]
        );
    }
}
