//! `sepal lab ping`: every pod pings every other pod's first address once, in parallel, and the
//! result is printed as a matrix (rows: source, columns: destination). In a dual-stack lab every
//! pod's IPv6 address too, in a second matrix.

use super::net;
use super::state::LabState;
use anyhow::Result;
use serde_json::json;

pub fn matrix(lab: &LabState, as_json: bool) -> Result<()> {
    let pods = &lab.pods;
    let v6 = |ip: &String| ip.contains(':');
    // The addresses to ping, one matrix each: every pod's first one, and in a dual-stack lab
    // (whose underlay routes IPv6) every pod's IPv6 one.
    let first: Vec<Option<String>> = pods.iter().map(|p| p.ips.first().cloned()).collect();
    let mut targets = vec![("", first)];
    if lab.dual_stack() {
        let ipv6: Vec<Option<String>> = pods
            .iter()
            .map(|p| p.ips.iter().find(|ip| v6(ip)).cloned())
            .collect();
        if ipv6.iter().any(Option::is_some) {
            targets[0].0 = "IPv4";
            targets.push(("IPv6", ipv6));
        }
    }
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let mut rows = Vec::new();
    for (k, (family, ips)) in targets.iter().enumerate() {
        let results = ping_all(lab, ips);
        if as_json {
            for (i, row) in results.iter().enumerate() {
                for (j, ok) in row.iter().enumerate() {
                    if let Some(ok) = ok {
                        rows.push(
                            json!({"from": names[i], "to": names[j], "ip": ips[j], "ok": ok}),
                        );
                    }
                }
            }
            continue;
        }
        if !family.is_empty() {
            if k > 0 {
                println!();
            }
            println!("{family}");
        }
        print_matrix(&names, &results);
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"name": lab.name, "results": rows}))?
        );
    }
    Ok(())
}

/// Every pod pings `ips[j]` of every other pod j once, all in parallel; None on the diagonal
/// and where a pod has no such address.
fn ping_all(lab: &LabState, ips: &[Option<String>]) -> Vec<Vec<Option<bool>>> {
    let pods = &lab.pods;
    std::thread::scope(|scope| {
        let handles: Vec<Vec<_>> = pods
            .iter()
            .enumerate()
            .map(|(i, from)| {
                ips.iter()
                    .enumerate()
                    .map(|(j, target)| {
                        scope.spawn(move || {
                            if i == j {
                                return None;
                            }
                            let ip = target.as_ref()?;
                            let cmd = if ip.contains(':') { "ping -6" } else { "ping" };
                            Some(
                                net::sh(&from.netns, &format!("{cmd} -c1 -W1 {ip} >/dev/null"))
                                    .is_ok(),
                            )
                        })
                    })
                    .collect()
            })
            .collect();
        handles
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|h| h.join().unwrap_or(Some(false)))
                    .collect()
            })
            .collect()
    })
}

fn print_matrix(names: &[String], results: &[Vec<Option<bool>>]) {
    let labels: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, name)| format!("{} {name}", i + 1))
        .collect();
    let header = "from \\ to";
    let width = labels
        .iter()
        .map(String::len)
        .chain([header.len()])
        .max()
        .unwrap_or(0);
    print!("{header:width$}");
    for j in 0..names.len() {
        print!(" {:>3}", j + 1);
    }
    println!();
    let (mut ok, mut total) = (0, 0);
    for (i, row) in results.iter().enumerate() {
        print!("{:width$}", labels[i]);
        for cell in row {
            let mark = match cell {
                None => "-",
                Some(true) => "ok",
                Some(false) => "XX",
            };
            total += usize::from(cell.is_some());
            ok += usize::from(*cell == Some(true));
            print!(" {mark:>3}");
        }
        println!();
    }
    println!("{ok}/{total} pairs reachable");
}
