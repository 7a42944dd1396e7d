// sigs.k8s.io/network-policy-api, the ClusterNetworkPolicy API: scripts/kube-build copies the
// experimental channel's CRD from this module (config/crd/experimental) into target/kube/bin/crds,
// where the tests' control planes and `sepal lab up --kubernetes` install it. A module of its own
// beside ../go.mod, as containerd's is: requiring it there would raise golang.org/x/net,
// kube-openapi, structured-merge-diff and a dozen other modules kube-apiserver, etcd and kubelet
// are built with above the versions their release was tested with. Sepal does not own the CRD,
// and no file of the module is kept in this repository. Pinned here and nowhere else.
module sepal/scripts/kube/network-policy-api

go 1.26.6

// v0.3.0: v1alpha2 (served) and v1beta1 (storage), the API felix/src/policy/cnp_api.rs reads.
require sigs.k8s.io/network-policy-api v0.3.0
