//! Revocation: conntrack lets established and related packets through before any policy rule is
//! evaluated, so when a policy change denies a flow that is already established, its conntrack
//! entry must go. The next packet of the flow is then looked up as new (TCP loose pick-up), meets
//! the policy rules and is dropped.
//!
//! Which entries to remove is decided by `Explainer` on the same cluster model the rules were
//! compiled from, for the directions this node enforces: egress of its own pods and ingress to
//! its own pods.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::exec::{self, ExecError};
use crate::policy::{Cluster, ExplainPeer, Explainer, Family, Protocol};

/// One conntrack entry: its original direction (as the first packet went, which names the
/// entry), and where the flow is really delivered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub protocol: Protocol,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// The reply direction's source address and port: `dst` and `dport` unless DNAT rewrote
    /// them (kube-proxy for a Service's ClusterIP or NodePort, a hostPort). Policy runs in the
    /// forward hook, after DNAT, so this is the destination its rules saw, and the one
    /// revocation judges; the original tuple still names the entry to delete.
    pub to: IpAddr,
    pub to_port: u16,
}

impl Flow {
    /// A flow no NAT touched.
    pub fn direct(protocol: Protocol, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Flow {
        Flow {
            protocol,
            src,
            dst,
            sport,
            dport,
            to: dst,
            to_port: dport,
        }
    }
}

/// Parses `conntrack -L` output (plain or `-o extended`): TCP, UDP and SCTP entries; anything
/// else (ICMP, unparsable lines) is skipped.
pub fn parse_list(text: &str) -> Vec<Flow> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Flow> {
    let mut protocol = None;
    // The first of each key belongs to the original direction, the second to the reply's.
    let (mut src, mut dst, mut sport, mut dport) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for token in line.split_whitespace() {
        match token.split_once('=') {
            Some(("src", v)) => src.push(v.parse::<IpAddr>().ok()?),
            Some(("dst", v)) => dst.push(v.parse::<IpAddr>().ok()?),
            Some(("sport", v)) => sport.push(v.parse::<u16>().ok()?),
            Some(("dport", v)) => dport.push(v.parse::<u16>().ok()?),
            Some(_) => {}
            None if protocol.is_none() && src.is_empty() => {
                protocol = Protocol::from_api(&token.to_ascii_uppercase())
            }
            None => {}
        }
    }
    let (src0, dst0) = (*src.first()?, *dst.first()?);
    let (sport0, dport0) = (*sport.first()?, *dport.first()?);
    Some(Flow {
        protocol: protocol?,
        src: src0,
        dst: dst0,
        sport: sport0,
        dport: dport0,
        to: src.get(1).copied().unwrap_or(dst0),
        to_port: sport.get(1).copied().unwrap_or(dport0),
    })
}

/// The flows among `flows` that the policy in `cluster` no longer allows in a direction this
/// node enforces (pods with `host_iface` set are this node's), judged on where each flow is
/// delivered (after DNAT). Pure.
pub fn denied(cluster: &Cluster, flows: &[Flow]) -> Vec<Flow> {
    let explainer = Explainer::new(cluster);
    let local = |ip: &IpAddr| {
        explainer
            .pod_of(ip)
            .is_some_and(|pod| pod.host_iface.is_some())
    };
    flows
        .iter()
        .filter(|f| {
            let (src_local, dst_local) = (local(&f.src), local(&f.to));
            if !src_local && !dst_local {
                return false;
            }
            match explainer.explain(
                &ExplainPeer::Ip(f.src),
                &ExplainPeer::Ip(f.to),
                f.protocol,
                f.to_port,
            ) {
                Ok(e) => (src_local && !e.egress.allows()) || (dst_local && !e.ingress.allows()),
                Err(_) => false,
            }
        })
        .cloned()
        .collect()
}

/// The `conntrack` tool in one network namespace.
#[derive(Debug, Clone, Default)]
pub struct Conntrack {
    netns: Option<PathBuf>,
}

impl Conntrack {
    /// `conntrack` in the current network namespace.
    pub fn new() -> Conntrack {
        Conntrack::default()
    }

    /// `conntrack` in the network namespace at `path`.
    pub fn in_netns(path: impl Into<PathBuf>) -> Conntrack {
        Conntrack {
            netns: Some(path.into()),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, ExecError> {
        exec::run(
            &["conntrack".to_string()],
            self.netns.as_deref(),
            args,
            None,
        )
    }

    /// Every TCP, UDP and SCTP entry of both families.
    pub fn list(&self) -> Result<Vec<Flow>, ExecError> {
        self.list_families(&Family::ALL)
    }

    /// Every TCP, UDP and SCTP entry of the given families.
    pub fn list_families(&self, families: &[Family]) -> Result<Vec<Flow>, ExecError> {
        let mut flows = Vec::new();
        for family in families {
            let family = match family {
                Family::V4 => "ipv4",
                Family::V6 => "ipv6",
            };
            flows.extend(parse_list(&self.run(&["-L", "-f", family])?));
        }
        Ok(flows)
    }

    /// Removes the entry of `flow`. An entry that is already gone is not an error.
    pub fn delete(&self, flow: &Flow) -> Result<(), ExecError> {
        let family = if flow.src.is_ipv4() { "ipv4" } else { "ipv6" };
        let (src, dst) = (flow.src.to_string(), flow.dst.to_string());
        let (sport, dport) = (flow.sport.to_string(), flow.dport.to_string());
        let args = [
            "-D",
            "-f",
            family,
            "-p",
            flow.protocol.nft(),
            "-s",
            &src,
            "-d",
            &dst,
            "--sport",
            &sport,
            "--dport",
            &dport,
        ];
        match self.run(&args) {
            // conntrack exits non-zero when no entry matched (the flow ended meanwhile).
            Err(ExecError::Failed { stderr, .. }) if stderr.contains("0 flow entries") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Lists the entries, and removes those of flows `cluster`'s policy denies on this node;
    /// returns them. Only the address families of this node's pods are listed (a flow this node
    /// enforces has one of them at an end), none when it has no pods.
    pub fn revoke(&self, cluster: &Cluster) -> Result<Vec<Flow>, ExecError> {
        let families = local_families(cluster);
        if families.is_empty() {
            return Ok(Vec::new());
        }
        let flows = denied(cluster, &self.list_families(&families)?);
        for flow in &flows {
            self.delete(flow)?;
        }
        Ok(flows)
    }
}

/// The address families of this node's pods (those with a host veth).
pub fn local_families(cluster: &Cluster) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|&f| {
            cluster
                .pods
                .iter()
                .filter(|p| p.host_iface.is_some())
                .any(|p| p.ips.iter().any(|ip| Family::of(ip) == f))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_original_direction_of_tcp_udp_sctp() {
        let text = "\
tcp      6 431999 ESTABLISHED src=10.244.0.10 dst=10.244.0.20 sport=40000 dport=80 src=10.244.0.20 dst=10.244.0.10 sport=80 dport=40000 [ASSURED] mark=0 use=1
ipv6     10 udp      17 29 src=fd00::1 dst=fd00::2 sport=5353 dport=53 [UNREPLIED] src=fd00::2 dst=fd00::1 sport=53 dport=5353 mark=0 use=1
sctp     132 3 COOKIE_WAIT src=10.0.0.1 dst=10.0.0.2 sport=1 dport=81 [UNREPLIED] src=10.0.0.2 dst=10.0.0.1 sport=81 dport=1
icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=1 src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=1
garbage
";
        let flows = parse_list(text);
        assert_eq!(flows.len(), 3);
        assert_eq!(
            flows[0],
            Flow::direct(
                Protocol::Tcp,
                "10.244.0.10".parse().unwrap(),
                "10.244.0.20".parse().unwrap(),
                40000,
                80
            )
        );
        assert_eq!(flows[1].protocol, Protocol::Udp);
        assert_eq!(flows[1].dport, 53);
        assert_eq!(flows[2].protocol, Protocol::Sctp);
    }

    fn flow(src: &str, dst: &str, dport: u16) -> Flow {
        Flow::direct(
            Protocol::Tcp,
            src.parse().unwrap(),
            dst.parse().unwrap(),
            40000,
            dport,
        )
    }

    #[test]
    fn a_service_flow_is_judged_where_dnat_delivered_it() {
        // kube-proxy's DNAT: the client x/a (.10) opened 10.96.0.10:80 (a ClusterIP), delivered
        // to x/b (.11) on 8080; the reply comes from there. The original tuple names the entry.
        let text = "tcp      6 431999 ESTABLISHED src=10.244.0.10 dst=10.96.0.10 sport=40000 dport=80 \
                    src=10.244.0.11 dst=10.244.0.10 sport=8080 dport=40000 [ASSURED] mark=0 use=1\n";
        let flows = parse_list(text);
        let service = Flow {
            to: "10.244.0.11".parse().unwrap(),
            to_port: 8080,
            ..flow("10.244.0.10", "10.96.0.10", 80)
        };
        assert_eq!(flows, vec![service.clone()]);
        // x/b admits only port 80 from y: the flow to its 8080 is denied, though neither the
        // ClusterIP nor its port 80 is anything policy knows. y/a (.13) on the same Service
        // path to x/b's port 80 stays.
        let c = crate::policy::tests::cluster(&[
            "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{ports: [{port: 80}]}]\n",
        ]);
        let allowed = Flow {
            to: "10.244.0.11".parse().unwrap(),
            to_port: 80,
            ..flow("10.244.0.13", "10.96.0.10", 80)
        };
        assert_eq!(denied(&c, &[service.clone(), allowed]), vec![service]);
    }

    #[test]
    fn denies_only_flows_this_node_enforces() {
        // x/a .10, x/b .11, x/c .12, y/a .13, y/b .14; x/c and z/a live on another node.
        let mut c = crate::policy::tests::cluster(&[
            "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
            "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{ports: [{port: 80}]}]\n",
        ]);
        for p in &mut c.pods {
            if (&*p.namespace == "x" && &*p.name == "c")
                || (&*p.namespace == "z" && &*p.name == "a")
            {
                std::sync::Arc::make_mut(p).host_iface = None;
            }
        }
        let into_xa = flow("10.244.0.13", "10.244.0.10", 80);
        let outside_into_xa = flow("192.0.2.1", "10.244.0.10", 80);
        let xb_web = flow("10.244.0.13", "10.244.0.11", 80);
        let xb_other = flow("10.244.0.13", "10.244.0.11", 81);
        let out_of_x = flow("10.244.0.10", "10.244.0.14", 80);
        let remote_only = flow("10.244.0.16", "10.244.0.12", 80);
        let flows = [
            into_xa.clone(),
            outside_into_xa.clone(),
            xb_web,
            xb_other.clone(),
            out_of_x,
            remote_only,
        ];
        assert_eq!(denied(&c, &flows), vec![into_xa, outside_into_xa, xb_other]);
    }

    #[test]
    fn only_the_families_of_local_pods_are_listed() {
        let mut c = crate::policy::tests::cluster(&[]);
        assert_eq!(local_families(&c), vec![Family::V4]);
        std::sync::Arc::make_mut(&mut c.pods[0])
            .ips
            .push("fd00::10".parse().unwrap());
        assert_eq!(local_families(&c), vec![Family::V4, Family::V6]);
        for p in &mut c.pods {
            std::sync::Arc::make_mut(p).host_iface = None;
        }
        assert_eq!(local_families(&c), vec![]);
    }
}
