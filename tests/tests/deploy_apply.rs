// deploy/ applied for real: what a cluster operator runs, against a real API server. The CRDs'
// structural schemas, defaulting and pruning, the RBAC and the DaemonSet are checked by the
// server itself, not only against offline schemas (deploy/validate keeps those).

use sepal_tests::kube::{deploy_dir, Cluster};

fn path(rel: &str) -> String {
    deploy_dir().join(rel).display().to_string()
}

#[test]
fn deploy_applies_server_side_and_again_without_conflicts() {
    let c = Cluster::start();
    let args = [
        "apply",
        "--server-side",
        "-f",
        &path("crds/"),
        "-f",
        &path(""),
    ];
    let out = c
        .try_kubectl(&args, None)
        .unwrap_or_else(|e| panic!("kubectl apply --server-side of deploy/ failed: {e}"));
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/bgppeers.sepal.dev",
        "namespace/sepal-system",
        "serviceaccount/sepal-node",
        "clusterrole.rbac.authorization.k8s.io/sepal-node",
        "daemonset.apps/sepal-node",
        "daemonset.apps/sepal-bfd",
    ] {
        assert!(out.contains(object), "{object} not applied:\n{out}");
    }
    // A second apply by the same manager owns every field already: no conflict, no change.
    c.try_kubectl(&args, None)
        .unwrap_or_else(|e| panic!("a second server-side apply of deploy/ failed: {e}"));
    let ds = c
        .get("daemonset", "sepal-system", "sepal-node")
        .expect("DaemonSet");
    assert_eq!(
        ds["metadata"]["generation"], 1,
        "the second apply changed the DaemonSet"
    );
    // The server defaulted what the manifests leave out, and kept what they say.
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "sepal-node"
    );
    assert_eq!(ds["spec"]["revisionHistoryLimit"], 10);
    // BFD is replaced only when an operator deletes its pods, never by a rollout of the agent.
    let bfd = c
        .get("daemonset", "sepal-system", "sepal-bfd")
        .expect("BFD DaemonSet");
    assert_eq!(bfd["spec"]["updateStrategy"]["type"], "OnDelete");
}

#[test]
fn examples_pass_server_side_dry_run_and_bad_objects_are_refused_by_the_crds() {
    let c = Cluster::start();
    c.install_sepal();
    c.try_kubectl(
        &["apply", "--dry-run=server", "-f", &path("examples/")],
        None,
    )
    .unwrap_or_else(|e| panic!("deploy/examples refused by the API server: {e}"));

    let refused = |peer: &str| {
        let doc = format!(
            "{{\"apiVersion\": \"sepal.dev/v1alpha1\", \"kind\": \"BGPPeer\", \
             \"metadata\": {{\"name\": \"bad\"}}, \"spec\": {peer}}}"
        );
        match c.try_kubectl(&["apply", "--server-side", "-f", "-"], Some(&doc)) {
            Ok(out) => panic!("the API server admitted a malformed BGPPeer {peer}: {out}"),
            Err(e) => e,
        }
    };
    let e = refused(r#"{"peerIP": "10.0.0.1", "asNumber": 0}"#);
    assert!(
        e.contains("spec.asNumber") && e.contains("greater than or equal to 1"),
        "{e}"
    );
    let e = refused(r#"{"peerIP": "10.0.0.1", "asNumber": 65000, "holdTime": "ninety"}"#);
    assert!(
        e.contains("spec.holdTime") && e.contains("should match"),
        "{e}"
    );
    // Neither peerIP nor interface: the CRD's validation rule refuses it.
    let e = refused(r#"{"asNumber": 65000}"#);
    assert!(
        e.contains("spec.peerIP is required unless spec.interface"),
        "{e}"
    );
    // A field the schema does not know (a typo of asNumber): the structural schema lets the
    // server name it, instead of pruning it silently.
    let e = refused(r#"{"peerIP": "10.0.0.1", "asNumber": 65000, "peerAS": 65001}"#);
    assert!(
        e.contains(".spec.peerAS: field not declared in schema"),
        "{e}"
    );
    assert!(
        c.get("bgppeer", "", "bad").is_none(),
        "a refused BGPPeer was stored"
    );
}
