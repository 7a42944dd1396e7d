//! The top-of-rack configurations Sepal is tested against (BIRD 2, FRR, GoBGP), kept as templates
//! in docs/peering/ so the BGP peering guide, the lab and the tests show one and the same text.
//!
//! A template is the daemon's own config with `@KEY@` placeholders. The lines between
//! `# BEGIN node` and `# END node` repeat once per node with that node's values. The lines
//! between `# BEGIN ipv6` and `# END ipv6` (the IPv6 address family) are left out when the
//! cluster has no IPv6 pod range (`POD_RANGE6` unset). A line holding a placeholder whose value is
//! `None` is left out (e.g. the password line when there is none).
//! The routing tests include this file by path: it depends on nothing but std.

use std::collections::BTreeMap;

pub const BIRD: &str = include_str!("../../../docs/peering/bird.conf");
pub const FRR: &str = include_str!("../../../docs/peering/frr.conf");
pub const GOBGP: &str = include_str!("../../../docs/peering/gobgpd.toml");
/// The loop that copies GoBGP's best paths into the kernel (`sh`, run beside gobgpd).
pub const GOBGP_FIB: &str = include_str!("../../../docs/peering/gobgp-fib.sh");

/// Placeholder values: key without the `@`s, and `None` to leave the line out.
pub type Values = BTreeMap<&'static str, Option<String>>;

const BEGIN: &str = "# BEGIN node";
const END: &str = "# END node";
const BEGIN_V6: &str = "# BEGIN ipv6";
const END_V6: &str = "# END ipv6";

/// Fills `template`: `global` everywhere, each entry of `nodes` (on top of `global`) in the
/// per-node sections. A placeholder with no value at all is an error naming it.
pub fn render(template: &str, global: &Values, nodes: &[Values]) -> Result<String, String> {
    let dual_stack = matches!(global.get("POD_RANGE6"), Some(Some(_)));
    let mut out = String::new();
    let mut section: Option<Vec<&str>> = None;
    for line in ipv6_sections(template, dual_stack)? {
        match (line.trim(), section.as_mut()) {
            (BEGIN, None) => section = Some(Vec::new()),
            (END, Some(lines)) => {
                for node in nodes {
                    let mut values = global.clone();
                    values.extend(node.iter().map(|(k, v)| (*k, v.clone())));
                    for l in lines.iter() {
                        push_line(&mut out, l, &values)?;
                    }
                }
                section = None;
            }
            (BEGIN | END, _) => return Err(format!("unbalanced {line:?} in the template")),
            (_, Some(lines)) => lines.push(line),
            (_, None) => push_line(&mut out, line, global)?,
        }
    }
    if section.is_some() {
        return Err(format!("{BEGIN} without {END} in the template"));
    }
    Ok(out)
}

/// The template's lines without the IPv6 sections' markers, and without their contents unless
/// `keep`.
fn ipv6_sections(template: &str, keep: bool) -> Result<Vec<&str>, String> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in template.lines() {
        match (line.trim(), inside) {
            (BEGIN_V6, false) => inside = true,
            (END_V6, true) => inside = false,
            (BEGIN_V6 | END_V6, _) => return Err(format!("unbalanced {line:?} in the template")),
            _ if inside && !keep => {}
            _ => lines.push(line),
        }
    }
    if inside {
        return Err(format!("{BEGIN_V6} without {END_V6} in the template"));
    }
    Ok(lines)
}

fn push_line(out: &mut String, line: &str, values: &Values) -> Result<(), String> {
    let mut rendered = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('@') {
        let Some(len) = rest[start + 1..].find('@') else {
            break;
        };
        let key = &rest[start + 1..start + 1 + len];
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        {
            // Not a placeholder (e.g. an address with '@' in a comment): keep the '@'.
            rendered.push_str(&rest[..=start]);
            rest = &rest[start + 1..];
            continue;
        }
        match values.get(key) {
            Some(Some(v)) => {
                rendered.push_str(&rest[..start]);
                rendered.push_str(v);
                rest = &rest[start + len + 2..];
            }
            Some(None) => return Ok(()),
            None => return Err(format!("no value for @{key}@ in {line:?}")),
        }
    }
    rendered.push_str(rest);
    out.push_str(&rendered);
    out.push('\n');
    Ok(())
}

/// Shorthand for building [`Values`].
pub fn values<const N: usize>(pairs: [(&'static str, Option<String>); N]) -> Values {
    pairs.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn fills_repeats_and_drops_unset_lines() {
        let t = "as @AS@\n# BEGIN node\nneighbor @ADDR@\npassword @PW@\n# END node\nend\n";
        let out = render(
            t,
            &values([("AS", some("65000")), ("PW", None)]),
            &[
                values([("ADDR", some("10.0.0.2"))]),
                values([("ADDR", some("10.0.1.2"))]),
            ],
        )
        .unwrap();
        assert_eq!(out, "as 65000\nneighbor 10.0.0.2\nneighbor 10.0.1.2\nend\n");
    }

    #[test]
    fn missing_value_and_unbalanced_sections_are_errors() {
        assert!(render("as @AS@\n", &Values::new(), &[])
            .unwrap_err()
            .contains("@AS@"));
        assert!(render("# BEGIN node\nx\n", &Values::new(), &[]).is_err());
        assert!(render("# END node\n", &Values::new(), &[]).is_err());
    }

    #[test]
    fn the_peering_guide_shows_the_templates_word_for_word() {
        let guide = include_str!("../../../docs/bgp-peering.md");
        for t in [BIRD, FRR, GOBGP, GOBGP_FIB] {
            assert!(guide.contains(t), "docs/bgp-peering.md lacks:\n{t}");
        }
    }

    #[test]
    fn shipped_templates_render_with_every_value() {
        let global = values([
            ("ROUTER_ID", some("10.0.0.1")),
            ("TOR_AS", some("65000")),
            ("HOLD", some("9")),
            ("KEEPALIVE", some("3")),
            ("PASSWORD", None),
            ("DEFAULT_ROUTE", None),
            ("POD_RANGE", some("10.244.0.0/16")),
            ("POD_RANGE_LEN", some("16")),
            ("SERVICE_RANGE", None),
            ("SERVICE_RANGE_LEN", None),
        ]);
        let node = values([
            ("NAME", some("n1")),
            ("TOR_ADDR", some("10.0.1.1")),
            ("NODE_ADDR", some("10.0.1.2")),
            ("NODE_AS", some("64601")),
        ]);
        for t in [BIRD, FRR, GOBGP] {
            let out = render(t, &global, std::slice::from_ref(&node)).unwrap();
            assert!(out.contains("10.0.1.2") && !out.contains('@'), "{out}");
            assert!(!out.contains("password"), "{out}");
            let ipv6_config = out
                .lines()
                .filter(|l| !l.trim_start().starts_with(['#', '!']))
                .any(|l| l.contains("ipv6"));
            assert!(!ipv6_config, "IPv4-only cluster:\n{out}");
        }
        // Dual-stack: the IPv6 sections are in, with the ToR's IPv6 next hop where the daemon
        // needs it spelled out (FRR takes the interface's global address by itself).
        let mut global6 = global.clone();
        global6.extend(values([
            ("POD_RANGE6", some("fd10:244::/32")),
            ("POD_RANGE6_LEN", some("32")),
        ]));
        let mut node6 = node.clone();
        node6.extend(values([("TOR_ADDR6", some("fd00:10:1::1"))]));
        for t in [BIRD, FRR, GOBGP] {
            let out = render(t, &global6, std::slice::from_ref(&node6)).unwrap();
            assert!(out.contains("fd10:244::/32") && !out.contains('@'), "{out}");
            assert!(t == FRR || out.contains("fd00:10:1::1"), "{out}");
        }
    }

    #[test]
    fn ipv6_sections_are_kept_or_dropped_whole() {
        let t = "a\n# BEGIN ipv6\nb @POD_RANGE6@\n# BEGIN node\nc @N@\n# END node\n# END ipv6\nd\n";
        let node = values([("N", some("1"))]);
        let v4 = render(t, &Values::new(), std::slice::from_ref(&node)).unwrap();
        assert_eq!(v4, "a\nd\n");
        let v6 = render(
            t,
            &values([("POD_RANGE6", some("fd00::/8"))]),
            std::slice::from_ref(&node),
        )
        .unwrap();
        assert_eq!(v6, "a\nb fd00::/8\nc 1\nd\n");
        assert!(render("# BEGIN ipv6\n", &Values::new(), &[]).is_err());
        assert!(render("# END ipv6\n", &Values::new(), &[]).is_err());
    }
}
