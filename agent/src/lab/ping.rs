//! `sepal lab ping`: every pod pings every other pod's first address once, in parallel, and the
//! result is printed as a matrix (rows: source, columns: destination).

use super::net;
use super::state::LabState;
use anyhow::Result;
use serde_json::json;

pub fn matrix(lab: &LabState, as_json: bool) -> Result<()> {
    let pods = &lab.pods;
    let results: Vec<Vec<Option<bool>>> = std::thread::scope(|scope| {
        let handles: Vec<Vec<_>> = pods
            .iter()
            .map(|from| {
                pods.iter()
                    .map(|to| {
                        let same = std::ptr::eq(from, to);
                        let target = to.ips.first().cloned();
                        scope.spawn(move || {
                            if same {
                                return None;
                            }
                            let ip = target?;
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
    });
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    if as_json {
        let mut rows = Vec::new();
        for (i, row) in results.iter().enumerate() {
            for (j, ok) in row.iter().enumerate() {
                if let Some(ok) = ok {
                    rows.push(json!({"from": names[i], "to": names[j], "ip": pods[j].ips.first(), "ok": ok}));
                }
            }
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"name": lab.name, "results": rows}))?
        );
        return Ok(());
    }
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
    Ok(())
}
